"""HuBERT (and MERT, which is HuBERT-shaped) as a frozen tower: the public SSL models the semantic tokenizer may use.

The forward pass is transformers' `HubertModel` at inference, so a converted checkpoint
(`melody_jax.convert.hf_hubert`) gives its hidden states: a conv feature encoder (valid convs, no
padding; "group" norm mode: GroupNorm with one group per channel over the whole clip after the first
conv only; "layer" mode: LayerNorm over channels after every conv), LayerNorm + Linear feature
projection, a grouped positional conv (weight norm folded at conversion; an even kernel drops its
last output frame) + GELU added to the input, then post-LN blocks with biases (attention → add →
LN → FFN → add → LN) or, `stable_layer_norm`, pre-LN blocks and one final LayerNorm. MERT's deepnorm
scales both residual branches' inputs by `residual_scale`.

As a tokenizer (`hidden_states`) it takes audio at the pipeline's `input_rate` (24 kHz), resamples
it to the tower's `model_rate` inside the jitted function (16 kHz for HuBERT; MERT is 24 kHz) and
average-pools the frames (50 or 75 Hz) to tokens of `token_hop` input samples (960: 25 Hz): each
token is the mean of the frames whose receptive-field centre lies in its span. HuBERT (2 frames a
token) and MERT (3) pool whole groups; with a non-integer ratio a token averages ⌊r⌋ or ⌈r⌉ frames.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from melody_jax.audio.resample import resample
from melody_jax.models.conformer import LayerNorm, clip_norm, conv1d
from melody_jax.nn.attention import Attention, padding_mask
from melody_jax.nn.init import dense


def _param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str | None, ...],
           init=nn.initializers.lecun_normal()) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, names), shape)


class FeatureEncoder(nn.Module):
    """Valid strided convs → (norm) → GELU; `norm` "group" (first conv only) or "layer" (every conv)."""

    channels: Sequence[int]
    kernels: Sequence[int]
    strides: Sequence[int]
    norm: str = "group"
    bias: bool = False
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        x = audio[..., None].astype(self.dtype)
        for i, (c, k, s) in enumerate(zip(self.channels, self.kernels, self.strides)):
            w = _param(self, f"conv_{i}", (k, x.shape[-1], c), ("kernel", "conv_in" if i else None, "conv_out"))
            x = conv1d(x, w, s, (0, 0))
            if self.bias:
                x = x + _param(self, f"bias_{i}", (c,), ("conv_out",), nn.initializers.zeros).astype(self.dtype)
            x = nn.with_logical_constraint(x, ("batch", "length", "conv_out"))
            if self.norm == "layer":
                x = LayerNorm(self.epsilon, self.dtype, "conv_out", name=f"norm_{i}")(x)
            elif i == 0:
                x = clip_norm(self, x, self.epsilon, self.dtype)
            x = nn.gelu(x, approximate=False)
        return x


class PositionalConv(nn.Module):
    """Grouped conv over time ("same" length: an even kernel loses its last frame) → GELU."""

    kernel: int = 128
    groups: int = 16
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, k = x.shape[-1], self.kernel
        w = _param(self, "kernel", (k, d // self.groups, d), ("kernel", None, "embed"))
        b = _param(self, "bias", (d,), ("embed",), nn.initializers.zeros)
        h = conv1d(x, w, 1, (k // 2, k // 2 - (1 - k % 2)), groups=self.groups) + b.astype(self.dtype)
        return nn.gelu(h, approximate=False)


class HubertBlock(nn.Module):
    """Self-attention and a GELU FFN, biases everywhere; post-LN, or pre-LN when `stable`."""

    num_heads: int
    mlp_dim: int
    stable: bool = False
    residual_scale: float = 1.0
    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        attn_norm = LayerNorm(self.epsilon, self.dtype, name="attn_norm")
        mlp_norm = LayerNorm(self.epsilon, self.dtype, name="mlp_norm")
        attn = Attention(self.num_heads, dtype=self.dtype, use_rotary=False, use_bias=True, name="attn")

        def ffn(h):
            h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, use_bias=True, name="fc1")(h)
            h = nn.with_logical_constraint(nn.gelu(h, approximate=False), ("batch", "length", "mlp"))
            return dense(x.shape[-1], ("mlp", "embed"), self.dtype, use_bias=True, name="fc2")(h)

        if self.stable:
            x = x + attn(attn_norm(x), mask=mask)
            x = x + ffn(mlp_norm(x))
        else:
            x = attn_norm(self.residual_scale * x + attn(x, mask=mask))
            x = mlp_norm(self.residual_scale * x + ffn(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def conv_lengths(lengths: jax.Array | int, kernels: Sequence[int], strides: Sequence[int]):
    """Frames the valid convs make of `lengths` samples."""
    for k, s in zip(kernels, strides):
        lengths = (lengths - k) // s + 1
    return lengths


def pool_ids(frames: int, tokens: int, kernels: Sequence[int], strides: Sequence[int], model_rate: int,
             input_rate: int, token_hop: int) -> np.ndarray:
    """int [frames]: the token each frame's receptive-field centre falls in (`tokens` = none: dropped)."""
    field, hop = 1, 1
    for k, s in zip(kernels, strides):
        field, hop = field + (k - 1) * hop, hop * s
    centre = (np.arange(frames) * hop + (field - 1) / 2) * input_rate / model_rate  # in input samples
    return np.minimum(np.floor(centre / token_hop).astype(np.int32), tokens)


class Hubert(nn.Module):
    """`__call__(audio, mask)`: every hidden state (transformers' order); `hidden_states`: tokenizer frames."""

    conv_channels: Sequence[int] = (512,) * 7
    conv_kernels: Sequence[int] = (10, 3, 3, 3, 3, 2, 2)
    conv_strides: Sequence[int] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feature_norm: str = "group"
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    pos_kernel: int = 128
    pos_groups: int = 16
    stable_layer_norm: bool = False
    residual_scale: float = 1.0
    layer_norm_eps: float = 1e-5
    normalize_audio: bool = False  # the feature extractor's do_normalize, applied by `hidden_states`
    model_rate: int = 16000
    input_rate: int = 24000
    token_hop: int = 960
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.feature_encoder = FeatureEncoder(tuple(self.conv_channels), tuple(self.conv_kernels),
                                              tuple(self.conv_strides), self.feature_norm, self.conv_bias,
                                              dtype=self.dtype)
        self.feature_norm_layer = LayerNorm(self.layer_norm_eps, self.dtype, "conv_out")
        self.feature_proj = dense(self.embed_dim, ("conv_out", "embed"), self.dtype, use_bias=True)
        self.pos_conv = PositionalConv(self.pos_kernel, self.pos_groups, self.dtype)
        self.encoder_norm = LayerNorm(self.layer_norm_eps, self.dtype)
        self.blocks = [HubertBlock(self.num_heads, self.mlp_dim, self.stable_layer_norm, self.residual_scale,
                                   self.layer_norm_eps, self.dtype) for _ in range(self.num_layers)]

    @property
    def hop(self) -> int:
        """Input samples per token (960 at 24 kHz: 25 Hz)."""
        return self.token_hop

    def _states(self, audio: jax.Array, mask: jax.Array | None, upto: int) -> tuple[list[jax.Array], jax.Array]:
        """(hidden states 0..upto at the tower's frame rate, frame validity [B, F])."""
        h = self.feature_proj(self.feature_norm_layer(self.feature_encoder(audio)))
        frames = h.shape[1]
        lengths = audio.shape[1] if mask is None else mask.astype(jnp.int32).sum(-1)
        valid = jnp.arange(frames) < conv_lengths(jnp.asarray(lengths).reshape(-1, 1), self.conv_kernels,
                                                  self.conv_strides)
        valid = jnp.broadcast_to(valid, h.shape[:2])
        keys = None
        if mask is not None:
            h = jnp.where(valid[..., None], h, 0)
            keys = padding_mask(valid)
        h = nn.with_logical_constraint(h + self.pos_conv(h), ("batch", "length", "embed"))
        if not self.stable_layer_norm:
            h = self.encoder_norm(h)
        states = [h]
        for i, block in enumerate(self.blocks[:upto]):
            h = block(h, keys)
            states.append(self.encoder_norm(h) if self.stable_layer_norm and i == self.num_layers - 1 else h)
        return states, valid

    def __call__(self, audio: jax.Array, mask: jax.Array | None = None) -> tuple[list[jax.Array], jax.Array]:
        """audio [B, N] at `model_rate` (mask [B, N]: real samples) → (num_layers + 1 states [B, F, D],
        transformers' `hidden_states`, and frame validity [B, F])."""
        return self._states(audio, mask, self.num_layers)

    def hidden_states(self, audio: jax.Array, layer: int) -> jax.Array:
        """[B, N // token_hop, D]: state `layer` (0 = after the positional conv) of audio [B, N] at
        `input_rate`, pooled to tokens."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer={layer} must lie in [0, {self.num_layers}]")
        x = resample(audio.astype(jnp.float32), self.input_rate, self.model_rate)
        if self.normalize_audio:  # Wav2Vec2FeatureExtractor's do_normalize
            x = (x - x.mean(-1, keepdims=True)) * jax.lax.rsqrt(x.var(-1, keepdims=True) + 1e-7)
        h = self._states(x, None, layer)[0][layer].astype(jnp.float32)
        tokens = audio.shape[1] // self.token_hop
        ids = pool_ids(h.shape[1], tokens, self.conv_kernels, self.conv_strides, self.model_rate,
                       self.input_rate, self.token_hop)
        weights = np.eye(tokens + 1, tokens, dtype=np.float32)[ids]  # [F, T]; a dropped frame's row is 0
        weights /= np.maximum(weights.sum(0), 1.0)
        return jnp.einsum("bfd,ft->btd", h, jnp.asarray(weights))

