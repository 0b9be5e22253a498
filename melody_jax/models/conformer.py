"""wav2vec 2.0 with Conformer blocks (DESIGN §4.2): the self-supervised encoder of the semantic tokenizer.

audio [B, N] at 24 kHz → conv feature encoder (total stride 960 → 25 Hz) → LayerNorm → projection →
span masking (learned mask embedding) → Conformer blocks with rotary self-attention → context [B, T, D].
wav2vec 2.0: targets come from a Gumbel-softmax product quantizer (G groups × V entries) over the unmasked
conv features. HuBERT (`num_targets` > 0): a linear head gives logits over that many discrete targets
(k-means clusters computed outside, by the task) in place of the quantizer [choice: HuBERT projects and
takes cosines with learned cluster embeddings; a linear head is the same family with fewer knobs]. The
losses (`melody_jax.models.ssl_loss`) live outside the module.

Logical axes: conv channels `conv_in`/`conv_out`, attention `heads`, FFN `mlp`; the conv module's
depthwise channels are named `mlp` too (they are D wide, but it is their tensor-parallel axis), and
its GLU pointwise conv outputs [2, D] so the gate split never crosses a shard. The conv module uses
LayerNorm where the Conformer paper uses BatchNorm [choice: no batch statistics to carry or shard].
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.attention import Attention
from melody_jax.nn.init import dense
from melody_jax.nn.quantizers import perplexity


class LayerNorm(nn.Module):
    """LayerNorm in float32 with scale/bias named `axis_name` (flax's has no logical names)."""

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        names = (self.axis_name,)
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, names), (x.shape[-1],))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, names), (x.shape[-1],))
        return normalize(x, -1, scale, bias, self.epsilon, self.dtype)


def normalize(x: jax.Array, axis: int, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: jnp.dtype
              ) -> jax.Array:
    """(x − mean) / std over `axis`, in float32, then scale and bias per channel (the last axis)."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(axis, keepdims=True)
    var = jnp.square(x32 - mean).mean(axis, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(dtype)


def clip_norm(module: nn.Module, x: jax.Array, epsilon: float, dtype: jnp.dtype) -> jax.Array:
    """GroupNorm with one group per channel: each channel of x [B, T, C] over the clip's frames, with
    `module`'s `group_norm_scale` / `group_norm_bias` (the first conv of fairseq's "default" extractor)."""
    names = ("conv_out",)
    scale = module.param("group_norm_scale", nn.with_logical_partitioning(nn.initializers.ones, names), (x.shape[-1],))
    bias = module.param("group_norm_bias", nn.with_logical_partitioning(nn.initializers.zeros, names), (x.shape[-1],))
    return normalize(x, 1, scale, bias, epsilon, dtype)


def conv1d(x: jax.Array, kernel: jax.Array, stride: int, padding: tuple[int, int], groups: int = 1) -> jax.Array:
    """x [B, T, Cin], kernel [k, Cin/groups, Cout] → [B, T', Cout]."""
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), (stride,), [padding],
                                        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


class FeatureEncoder(nn.Module):
    """Strided convs, each → norm → GELU; kernel k = 2·stride padded so N samples give ⌊N / Π strides⌋ frames.

    `norm` "layer": LayerNorm over the channels of every frame after every conv (fairseq's "layer_norm"
    extractor); "group": after the first conv only, each channel normalised over the whole clip (fairseq's
    "default" extractor, wav2vec 2.0 / HuBERT base), which keeps how loud one frame is against another."""

    channels: Sequence[int]
    strides: Sequence[int]
    dtype: jnp.dtype = jnp.float32
    norm: str = "layer"

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        x = audio[..., None].astype(self.dtype)
        for i, (c, s) in enumerate(zip(self.channels, self.strides)):
            k = 2 * s
            names = ("kernel", "conv_in" if i else None, "conv_out")
            w = self.param(f"conv_{i}", nn.with_logical_partitioning(
                nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2),
                names), (k, x.shape[-1], c))
            b = self.param(f"bias_{i}", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)), (c,))
            x = conv1d(x, w, s, ((k - s) // 2, k - s - (k - s) // 2)) + b.astype(self.dtype)
            x = nn.with_logical_constraint(x, ("batch", "length", "conv_out"))
            if self.norm == "layer":
                x = LayerNorm(dtype=self.dtype, axis_name="conv_out", name=f"norm_{i}")(x)
            elif i == 0:
                x = clip_norm(self, x, 1e-5, self.dtype)
            x = nn.gelu(x, approximate=False)
        return x


class FeedForward(nn.Module):
    """LN → Linear → swish → dropout → Linear → dropout (the Conformer's half-step FFN, unscaled)."""

    mlp_dim: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        h = LayerNorm(dtype=self.dtype, name="norm")(x)
        h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, use_bias=True, name="fc1")(h)
        h = nn.with_logical_constraint(jax.nn.silu(h), ("batch", "length", "mlp"))
        h = nn.Dropout(self.dropout)(h, deterministic)
        h = dense(x.shape[-1], ("mlp", "embed"), self.dtype, use_bias=True, name="fc2")(h)
        return nn.Dropout(self.dropout)(h, deterministic)


class ConvModule(nn.Module):
    """LN → pointwise conv to [2, D] → GLU → depthwise conv → LN → swish → pointwise conv → dropout."""

    kernel_size: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        d = x.shape[-1]
        h = LayerNorm(dtype=self.dtype, name="norm")(x)
        h = dense((2, d), ("embed", None, "mlp"), self.dtype, use_bias=True, name="pointwise_in")(h)
        h = h[..., 0, :] * jax.nn.sigmoid(h[..., 1, :])
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        w = self.param("depthwise", nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2),
            ("kernel", None, "mlp")), (self.kernel_size, 1, d))
        b = self.param("depthwise_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (d,))
        pad = (self.kernel_size - 1) // 2
        h = conv1d(h, w, 1, (pad, self.kernel_size - 1 - pad), groups=d) + b.astype(self.dtype)
        h = jax.nn.silu(LayerNorm(dtype=self.dtype, axis_name="mlp", name="depthwise_norm")(h))
        h = dense(d, ("mlp", "embed"), self.dtype, use_bias=True, name="pointwise_out")(h)
        return nn.Dropout(self.dropout)(h, deterministic)


class ConformerBlock(nn.Module):
    """x + ½FFN, + MHSA (rotary), + conv module, + ½FFN, then LayerNorm (Gulati et al. 2020)."""

    num_heads: int
    mlp_dim: int
    conv_kernel: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        x = x + 0.5 * FeedForward(self.mlp_dim, self.dropout, self.dtype, name="ffn_in")(x, deterministic)
        h = LayerNorm(dtype=self.dtype, name="attn_norm")(x)
        h = Attention(self.num_heads, dtype=self.dtype, use_bias=True, name="attn")(h)
        x = x + nn.Dropout(self.dropout)(h, deterministic)
        x = x + ConvModule(self.conv_kernel, self.dropout, self.dtype, name="conv")(x, deterministic)
        x = x + 0.5 * FeedForward(self.mlp_dim, self.dropout, self.dtype, name="ffn_out")(x, deterministic)
        x = LayerNorm(dtype=self.dtype, name="final_norm")(x)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _ScannedBlock(ConformerBlock):
    """A ConformerBlock in `nn.scan`'s (carry, output) form; the output is the block's, when `collect`."""

    deterministic: bool = True
    collect: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None) -> tuple[jax.Array, jax.Array | None]:
        y = super().__call__(x, self.deterministic)
        return y, (y if self.collect else None)


class ScannedBlocks(nn.Module):
    """`num_layers` ConformerBlocks as one `nn.scan` over parameters stacked on a `layers` axis."""

    num_layers: int
    num_heads: int
    mlp_dim: int
    conv_kernel: int
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, collect: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """(last block's output, every block's output [L, …] when `collect`)."""
        block = nn.remat(_ScannedBlock, prevent_cse=False) if self.remat else _ScannedBlock
        stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                        length=self.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        return stack(self.num_heads, self.mlp_dim, self.conv_kernel, self.dropout, self.dtype, deterministic, collect,
                     name="layers")(x, None)


class GumbelQuantizer(nn.Module):
    """Product quantizer: G groups × V entries, Gumbel-softmax (hard, straight-through) while training.

    Returns (quantized [B, T, codevector_dim], codes int32 [B, T, G], soft perplexity, hard perplexity),
    each perplexity summed over the groups (at most G·V).
    The soft one (from batch-averaged softmax probabilities) drives the diversity loss.
    """

    num_groups: int
    num_vars: int
    codevector_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temperature: jax.Array | float, train: bool) -> tuple[jax.Array, ...]:
        g, v = self.num_groups, self.num_vars
        logits = dense((g, v), (None, None, "vocab"), jnp.float32, use_bias=True,
                       kernel_init=nn.initializers.normal(1.0), name="logits")(x)  # fairseq: N(0, 1), so
        # logits (std ≈ √C) outweigh the Gumbel noise and targets are stable from the start
        codebook = self.param("codevectors", nn.with_logical_partitioning(nn.initializers.uniform(1.0),
                                                                            (None, "vocab", None)),
                              (g, v, self.codevector_dim // g))
        if train:
            noisy = logits + jax.random.gumbel(self.make_rng("gumbel"), logits.shape)
            soft = jax.nn.softmax(noisy / temperature, -1)
            codes = jnp.argmax(noisy, -1)
            hard = jax.nn.one_hot(codes, v, dtype=soft.dtype)
            onehot = soft + jax.lax.stop_gradient(hard - soft)
        else:
            codes = jnp.argmax(logits, -1)
            onehot = jax.nn.one_hot(codes, v, dtype=jnp.float32)
        avg_probs = jax.nn.softmax(logits, -1).reshape(-1, g, v).mean(0)
        hard_probs = jax.nn.one_hot(codes, v).reshape(-1, g, v).mean(0)
        q = jnp.einsum("btgv,gvd->btgd", onehot, codebook).reshape(*x.shape[:-1], self.codevector_dim)
        return q.astype(self.dtype), codes.astype(jnp.int32), perplexity(avg_probs).sum(), perplexity(hard_probs).sum()


def span_mask(rng: jax.Array, shape: tuple[int, int], mask_prob: float, mask_length: int) -> jax.Array:
    """bool [B, T]: spans of `mask_length` frames starting at each frame with probability mask_prob / length
    (fairseq's meaning of mask_prob: the expected share of frames that start a span × length)."""
    starts = jax.random.bernoulli(rng, mask_prob / mask_length, shape).astype(jnp.int32)
    c = jnp.cumsum(starts, axis=1)
    before = jnp.pad(c, ((0, 0), (mask_length, 0)))[:, : shape[1]]
    return (c - before) > 0


class Wav2Vec2Conformer(nn.Module):
    """`__call__` is the pre-training forward; `hidden_states(audio, layer)` feeds the k-means tokenizer."""

    conv_channels: Sequence[int] = (512,) * 5
    conv_strides: Sequence[int] = (5, 4, 4, 4, 3)
    embed_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    conv_kernel: int = 31
    num_groups: int = 2
    num_vars: int = 320
    codevector_dim: int = 256
    final_dim: int = 256
    dropout: float = 0.1
    mask_prob: float = 0.65
    mask_length: int = 10
    normalize_audio: bool = True
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False  # the blocks as one nn.scan (ScannedBlocks): other parameter names
    num_targets: int = 0  # > 0: the HuBERT objective's head over that many targets, no quantizer
    num_codebooks: int = 1  # HuBERT: target codebooks, each with num_targets logits
    conv_norm: str = "layer"  # FeatureEncoder.norm: "layer" (every conv, per frame) or "group" (first, per clip)

    def setup(self):
        self.feature_encoder = FeatureEncoder(tuple(self.conv_channels), tuple(self.conv_strides), self.dtype,
                                              self.conv_norm)
        self.feature_norm = LayerNorm(dtype=self.dtype, axis_name="conv_out")
        self.feature_proj = dense(self.embed_dim, ("conv_out", "embed"), self.dtype, use_bias=True)
        self.mask_embedding = self.param("mask_embedding", nn.with_logical_partitioning(
            nn.initializers.uniform(1.0), ("embed",)), (self.embed_dim,))
        block = nn.remat(ConformerBlock, static_argnums=(2,)) if self.remat else ConformerBlock
        if self.scan_layers:
            self.stack = ScannedBlocks(self.num_layers, self.num_heads, self.mlp_dim, self.conv_kernel, self.dropout,
                                       self.dtype, self.remat)
        else:
            self.blocks = [block(self.num_heads, self.mlp_dim, self.conv_kernel, self.dropout, self.dtype)
                           for _ in range(self.num_layers)]
        if self.num_targets:
            self.target_head = dense(self.num_codebooks * self.num_targets, ("embed", "vocab"), jnp.float32,
                                     use_bias=True)
        else:
            self.quantizer = GumbelQuantizer(self.num_groups, self.num_vars, self.codevector_dim, self.dtype)
            self.project_q = dense(self.final_dim, ("embed", "latent"), jnp.float32, use_bias=True)
            self.final_proj = dense(self.final_dim, ("embed", "latent"), jnp.float32, use_bias=True)
        self.input_dropout = nn.Dropout(self.dropout)

    @property
    def hop(self) -> int:
        out = 1
        for s in self.conv_strides:
            out *= s
        return out

    def features(self, audio: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(conv features [B, T, C], the same normalised, projected [B, T, D])."""
        if self.normalize_audio:
            a = audio.astype(jnp.float32)
            audio = (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(a.var(-1, keepdims=True) + 1e-5)
        raw = self.feature_encoder(audio)
        feats = self.feature_norm(raw)
        return raw, feats, nn.with_logical_constraint(self.feature_proj(feats), ("batch", "length", "embed"))

    def hidden_states(self, audio: jax.Array, layer: int) -> jax.Array:
        """[B, T, D] output of block `layer` (1-based; 0 = the projected features), no masking, no dropout."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer={layer} must lie in [0, {self.num_layers}]")
        x = self.features(audio)[2]
        if self.scan_layers:  # every block runs; the one asked for is read out
            return x if layer == 0 else self.stack(x, True, collect=True)[1][layer - 1]
        for blk in self.blocks[:layer]:
            x = blk(x, True)
        return x

    def __call__(self, audio: jax.Array, *, temperature: jax.Array | float = 1.0, train: bool = True,
                 mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """Masked forward. `mask` bool [B, T] overrides the random spans (rng stream "mask"). HuBERT: returns
        {"logits" [B, T, num_codebooks, num_targets], "mask", "feature_penalty"}; wav2vec 2.0: context, targets
        and codes."""
        raw, feats, x = self.features(audio)
        penalty = jnp.mean(jnp.square(raw.astype(jnp.float32)))  # wav2vec 2.0's feature L2 penalty
        if mask is None:
            mask = span_mask(self.make_rng("mask"), x.shape[:2], self.mask_prob, self.mask_length)
        x = jnp.where(mask[..., None], self.mask_embedding.astype(x.dtype), x)
        x = self.input_dropout(x, not train)
        if self.scan_layers:
            x = self.stack(x, not train)[0]
        else:
            for blk in self.blocks:
                x = blk(x, not train)
        if self.num_targets:
            logits = self.target_head(x.astype(jnp.float32)).reshape(*x.shape[:2], self.num_codebooks, -1)
            return {"logits": logits, "mask": mask, "feature_penalty": penalty}
        q, codes, prob_ppl, code_ppl = self.quantizer(feats, temperature, train)
        return {"context": self.final_proj(x.astype(jnp.float32)), "targets": self.project_q(q.astype(jnp.float32)),
                "codes": codes, "mask": mask, "prob_perplexity": prob_ppl, "code_perplexity": code_ppl,
                "feature_penalty": penalty}
