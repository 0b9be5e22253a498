"""MusicGen LM (DESIGN §6): a pre-norm decoder over K interleaved codebooks, text by cross-attention,
melody by a one-hot chromagram prefix.

Inputs are pattern sequences `int32 [B, K, S]` (see `melody_jax.models.codebook_patterns`) whose empty
slots hold the special token `codebook_size`. Each codebook has its own embedding table (K tables of
`codebook_size + 1` rows, summed per step) and its own output head (`codebook_size` logits). The
model shifts the sequence right itself: step s is predicted from the input at position s, which holds
step s − 1 (the special token at s = 0), so logits `[B, K, S, V]` line up with their targets.

Conditions are computed once per sequence by `conditions()`: the text encoder is MuLan's text tower
(`melody_jax.models.mulan.Encoder`, the same module, unpooled) over byte tokens; the melody is the
argmax one-hot of a 12-bin chromagram `[B, F, 12]` projected to d_model and prepended as F prefix
positions. Classifier-free guidance drops a condition by zeroing it: a zero text context makes every
cross-attention output exactly 0 (no biases), a zero chromagram makes the prefix 0. An all-zero
(silent) chroma frame is null too — unlike audiocraft, which maps it to bin 0 — so passing zeros
generates without a melody.

With `decode=True` self-attention keeps its KV cache (`melody_jax.nn.attention`) and each
cross-attention keeps its projected text keys/values in the `cache` collection: the prefill call
passes the context and the prefix, later single-step calls pass neither.

Architecture options, for the public checkpoints (transformers' MusicGen; `melody_jax.convert`),
whose defaults are what this project trains: `norm` RMSNorm or LayerNorm (eps 1e-5, with bias);
`positions` rotary in every self-attention or sinusoidal (cos half then sin half) added once at the
input, numbered from the first prefix position and, when decoding, from the model's one
`decode_position`; `mlp_bias`; `text_encoder` bytes (MuLan's tower) or T5 (`melody_jax.models.t5`),
whose output `text_proj` maps to embed_dim (a Linear with bias) and the mask zeroes; and
`melody_mode` "prefix" (above) or "prepend", musicgen-melody's: no cross-attention, the prefix is
[melody_proj(one-hot chroma) tiled/truncated to `melody_frames`, projected text × mask], attended
causally with no padding mask; its null melody is the one-hot of bin 0. Stereo is 8 codebooks
[L0, R0, L1, R1, …] with delays (0, 0, 1, 1, …) (the pattern's business, not the model's).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.audio.chroma import NUM_CHROMA, chroma_onehot
from melody_jax.models.mulan import Encoder
from melody_jax.models.t5 import T5Encoder
from melody_jax.nn.attention import Attention, cached_attention, padding_mask
from melody_jax.nn.init import dense, embed_tokens
from melody_jax.nn.mlp import GeluMLP
from melody_jax.nn.norms import RMSNorm
from melody_jax.nn.scan import layer_stack
from melody_jax.text.byte_tokenizer import VOCAB_SIZE

ACT = ("batch", "length", "embed")
NORMS = ("rms", "layer")
POSITIONS = ("rotary", "sinusoidal")
TEXT_ENCODERS = ("bytes", "t5")
MELODY_MODES = ("prefix", "prepend")


def make_norm(kind: str, dtype: jnp.dtype, name: str | None = None) -> nn.Module:
    """RMSNorm, or LayerNorm with eps 1e-5 and a bias (torch's default, transformers' MusicGen)."""
    if kind == "layer":
        axis = lambda init: nn.with_logical_partitioning(init, ("embed",))  # noqa: E731
        return nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_fast_variance=False, scale_init=axis(nn.initializers.ones),
                            bias_init=axis(nn.initializers.zeros), name=name)
    return RMSNorm(dtype=dtype, name=name)


def sinusoids(positions: jax.Array, dim: int) -> jax.Array:
    """float32 [T, dim]: cos half then sin half, frequencies exp(−i ln 10000 / (dim/2 − 1))."""
    half = dim // 2
    freq = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
    angles = positions.astype(jnp.float32)[:, None] * freq
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def shift_right(seq: jax.Array, special: int) -> jax.Array:
    """`[B, K, S]` pattern sequence → the LM's inputs: position s holds step s − 1, position 0 `special`."""
    start = jnp.full(seq.shape[:2] + (1,), special, seq.dtype)
    return jnp.concatenate([start, seq[:, :, :-1]], axis=2)


class TextEncoder(nn.Module):
    """Byte tokens `[B, L]` → `float32 [B, L, embed_dim]`: MuLan's text tower without its pooling."""

    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        x = embed_tokens(self, "token_embedding", tokens, VOCAB_SIZE, self.embed_dim, self.dtype)
        encoder = Encoder(self.num_layers, self.num_heads, self.mlp_dim, out_dim=self.embed_dim, dtype=self.dtype,
                          remat=self.remat, pool=False, scan_layers=self.scan_layers, name="encoder")
        return encoder(x, mask.astype(bool), jnp.arange(tokens.shape[1]))


class CrossAttention(nn.Module):
    """Attention from x `[B, T, D]` to a text context `[B, L, Dc]`; keys/values cached when decoding."""

    num_heads: int
    dtype: jnp.dtype = jnp.float32
    decode: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array | None) -> jax.Array:
        d_model = x.shape[-1]
        head_dim = d_model // self.num_heads
        proj = lambda name, inp: dense((self.num_heads, head_dim), ("embed", "heads", "kv"), self.dtype,  # noqa: E731
                                       name=name)(inp)
        q = nn.with_logical_constraint(proj("query", x), ("batch", "length", "heads", "kv"))
        if context is not None:  # heads-major [B, H, L, hd], the layout cached_attention reads
            k = proj("key", context).transpose(0, 2, 1, 3)
            v = proj("value", context).transpose(0, 2, 1, 3)
            mask = context_mask.astype(bool)
        if self.decode:
            ck = self.variable("cache", "context_key", lambda: jnp.zeros(k.shape, k.dtype))
            cv = self.variable("cache", "context_value", lambda: jnp.zeros(v.shape, v.dtype))
            cm = self.variable("cache", "context_mask", lambda: jnp.zeros(mask.shape, bool))
            if context is not None:
                ck.value, cv.value, cm.value = k.astype(ck.value.dtype), v.astype(cv.value.dtype), mask
            k, v, mask = ck.value, cv.value, cm.value
        elif context is None:
            raise ValueError("cross-attention needs a context outside decode mode")
        layout = ("batch", "heads", "length", "kv")
        k, v = nn.with_logical_constraint(k, layout), nn.with_logical_constraint(v, layout)
        out = cached_attention(q, k, v, padding_mask(mask), head_dim**-0.5)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
        return dense(d_model, ("heads", "kv", "embed"), self.dtype, axis=(-2, -1), name="out")(out)


class MusicGenBlock(nn.Module):
    """x + SelfAttn(norm x); x + CrossAttn(norm x, text) unless `cross_attention` is off; x + GELU FFN(norm x)."""

    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    decode: bool = False
    norm: str = "rms"
    use_rotary: bool = True
    mlp_bias: bool = True
    cross_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None, context_mask: jax.Array | None) -> jax.Array:
        h = make_norm(self.norm, self.dtype, "attn_norm")(x)
        x = x + Attention(self.num_heads, dtype=self.dtype, use_rotary=self.use_rotary, decode=self.decode,
                          name="self_attn")(h, causal=True)
        if self.cross_attention:
            h = make_norm(self.norm, self.dtype, "cross_norm")(x)
            x = x + CrossAttention(self.num_heads, self.dtype, self.decode, name="cross_attn")(h, context, context_mask)
        h = make_norm(self.norm, self.dtype, "mlp_norm")(x)
        x = x + GeluMLP(self.mlp_dim, dtype=self.dtype, use_bias=self.mlp_bias, name="mlp")(h)
        return nn.with_logical_constraint(x, ACT)


class MusicGenLM(nn.Module):
    """`(seq [B, K, S], text_tokens, text_mask, chroma?, drop_text?, drop_melody?) → logits float32 [B, K, S, V]`.

    `drop_*` are bool `[B]` (True = replace that condition by its null, for CFG dropout and the
    unconditional half of guided sampling). `chroma` `[B, melody_frames, 12]` is needed iff `use_melody`
    (in "prepend" mode any number of frames, tiled to `melody_frames`; None = the null melody).
    """

    num_codebooks: int
    codebook_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    text_layers: int
    text_embed_dim: int
    text_heads: int
    text_mlp_dim: int
    use_melody: bool = True
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    decode: bool = False
    norm: str = "rms"  # rms | layer
    positions: str = "rotary"  # rotary | sinusoidal
    mlp_bias: bool = True
    text_encoder: str = "bytes"  # bytes | t5
    text_vocab_size: int = 0  # t5
    text_head_dim: int = 0  # t5: d_kv
    text_proj: bool = False  # Linear(text_embed_dim → embed_dim, with bias) after the text encoder
    melody_mode: str = "prefix"  # prefix | prepend
    melody_frames: int = 0  # prepend: the chroma prefix is tiled/truncated to this many frames
    scan_layers: bool = False  # the decoder's and the text encoder's blocks as one nn.scan each (`layers/…`)

    @property
    def special_token(self) -> int:
        return self.codebook_size

    @property
    def prepend(self) -> bool:
        return self.use_melody and self.melody_mode == "prepend"

    def setup(self):
        if self.text_encoder == "t5":
            self.text_tower = T5Encoder(self.text_vocab_size, self.text_layers, self.text_embed_dim, self.text_heads,
                                        self.text_head_dim, self.text_mlp_dim, dtype=self.dtype, remat=self.remat,
                                        scan_layers=self.scan_layers, name="text_encoder")
        else:
            self.text_tower = TextEncoder(self.text_layers, self.text_embed_dim, self.text_heads, self.text_mlp_dim,
                                          self.dtype, self.remat, self.scan_layers, name="text_encoder")
        if self.text_proj:
            self.text_projection = dense(self.embed_dim, (None, "embed"), self.dtype, use_bias=True)
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(self.num_codebooks**-0.5), (None, None, "embed")),
            (self.num_codebooks, self.codebook_size + 1, self.embed_dim))
        if self.use_melody:
            self.melody_proj = dense(self.embed_dim, (None, "embed"), self.dtype, use_bias=self.prepend)
        fields = (self.num_heads, self.mlp_dim, self.dtype, self.decode, self.norm, self.positions == "rotary",
                  self.mlp_bias, not self.prepend)
        if self.scan_layers:
            self.layers = layer_stack(MusicGenBlock, self.num_layers, 2, self.remat)(*fields)
        else:
            block = nn.remat(MusicGenBlock) if self.remat else MusicGenBlock
            self.layers = [block(*fields) for _ in range(self.num_layers)]
        self.final_norm = make_norm(self.norm, self.dtype)
        self.head = dense((self.num_codebooks, self.codebook_size), ("embed", None, "vocab"), self.dtype)
        if self.decode and self.positions == "sinusoidal":
            self.decode_position = self.variable("cache", "decode_position", lambda: jnp.array(0, jnp.int32))

    def conditions(self, text_tokens: jax.Array, text_mask: jax.Array, chroma: jax.Array | None = None,
                   drop_text: jax.Array | None = None, drop_melody: jax.Array | None = None):
        """(text context `[B, L, Dt]`, its mask `[B, L]`, melody prefix `[B, F, D]` or None).

        In "prepend" mode: (None, None, [melody prefix; text] `[B, melody_frames + L, D]`).
        """
        context = self.text_tower(text_tokens, text_mask)
        if self.text_proj:
            context = self.text_projection(context)
        if self.text_encoder == "t5":
            context = context * text_mask.astype(context.dtype)[:, :, None]
        if drop_text is not None:
            context = context * jnp.logical_not(drop_text).astype(context.dtype)[:, None, None]
        prefix = None
        if self.prepend:
            if chroma is None:  # no melody: the null one (transformers' default input features)
                chroma = jnp.zeros((text_tokens.shape[0], 1, NUM_CHROMA), jnp.float32)
            onehot = chroma_onehot(chroma)  # a silent frame → bin 0, as transformers' feature extractor
            if drop_melody is not None:
                null = jnp.zeros_like(onehot).at[..., 0].set(1.0)
                onehot = jnp.where(drop_melody[:, None, None], null, onehot)
            reps = -(-self.melody_frames // onehot.shape[1])
            onehot = jnp.tile(onehot, (1, reps, 1))[:, : self.melody_frames]
            prefix = jnp.concatenate([self.melody_proj(onehot).astype(context.dtype), context], axis=1)
            return None, None, nn.with_logical_constraint(prefix, ACT)
        if self.use_melody:
            if chroma is None or chroma.shape[-1] != NUM_CHROMA:
                raise ValueError(f"use_melody needs a chromagram [B, F, {NUM_CHROMA}], got "
                                 f"{None if chroma is None else chroma.shape}")
            onehot = chroma_onehot(chroma) * (chroma.max(axis=-1, keepdims=True) > 0)  # silent frame: null
            if drop_melody is not None:
                onehot = onehot * jnp.logical_not(drop_melody).astype(onehot.dtype)[:, None, None]
            prefix = nn.with_logical_constraint(self.melody_proj(onehot), ACT)
        return context, text_mask, prefix

    def logits(self, inputs: jax.Array, context: jax.Array | None = None, context_mask: jax.Array | None = None,
               prefix: jax.Array | None = None) -> jax.Array:
        """Shifted inputs `[B, K, S]` (after `prefix` `[B, F, D]` if given) → logits `[B, K, S, V]`."""
        rows = jnp.arange(self.num_codebooks)[None, :, None]
        x = self.embedding[rows, inputs].sum(axis=1).astype(self.dtype)  # [B, S, D]
        num_prefix = 0
        if prefix is not None:
            num_prefix = prefix.shape[1]
            x = jnp.concatenate([prefix.astype(self.dtype), x], axis=1)
        if self.positions == "sinusoidal":
            start = 0
            if self.decode:
                start = self.decode_position.value
                self.decode_position.value = start + x.shape[1]
            x = x + sinusoids(start + jnp.arange(x.shape[1]), self.embed_dim).astype(self.dtype)
        x = nn.with_logical_constraint(x, ACT)
        if self.scan_layers:
            x, _ = self.layers(x, context, context_mask)
        else:
            for layer in self.layers:
                x = layer(x, context, context_mask)
        x = self.final_norm(x[:, num_prefix:])
        logits = self.head(x).transpose(0, 2, 1, 3).astype(jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", None, "length", "vocab"))

    def __call__(self, seq: jax.Array, text_tokens: jax.Array, text_mask: jax.Array, chroma: jax.Array | None = None,
                 drop_text: jax.Array | None = None, drop_melody: jax.Array | None = None) -> jax.Array:
        context, mask, prefix = self.conditions(text_tokens, text_mask, chroma, drop_text, drop_melody)
        return self.logits(shift_right(seq, self.special_token), context, mask, prefix)
