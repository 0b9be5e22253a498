"""The dual-path diffusion (DPD) velocity network v̂_θ(z_δ; δ, semantic tokens) (DESIGN §4.5).

Latents [B, L, 16] are cut into S half-overlapping segments of K frames. Each dual-path block
runs a coarse path (columns merged K → K_MS, Roformer along the S axis with rotary self-attention,
cross-attention to the semantic tokens and a GELU FFN, columns repeated back to K) and a fine path
(two bidirectional SRUs along K, FiLM by the angle and mean semantic embeddings).

Classifier-free guidance [paper + choice]: `uncond` [B] marks examples whose cross-attention is
replaced by self-attention along S (same weights, rotary positions); we also drop the semantic mean
from their FiLM condition, so an unconditional output does not depend on the tokens at all. When a
mask is given both branches are computed and selected per example (≈ +15 % compute).

Token alignment [choice]: the paper's cross-attention has no positions, so it sees the 25-Hz tokens
as a set and can only match them to frames by content. On the synthetic latents of tasks/dpd.py
(tokens plus drift, scales 0.5 / 0.3) the tiny model without it reached the same velocity MSE at
δ = π/4 with the tokens zeroed as with them (0.206 / 0.206 after 300 steps, 0.152 / 0.149 after
1200). With `align_tokens`, each frame's input also gets the embedding of the token it lies in
(nearest-token upsampling T_ST → L, dropped for unconditional examples); it adds no parameters.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from melody_jax.diffusion.guidance import VelocityFn
from melody_jax.nn.attention import Attention
from melody_jax.nn.film import FiLM
from melody_jax.nn.init import dense
from melody_jax.nn.mlp import GeluMLP
from melody_jax.nn.norms import RMSNorm
from melody_jax.nn.scan import layer_stack
from melody_jax.nn.segment import num_segments, overlap_add, segment
from melody_jax.nn.sru import BiSRU

SEGMENTS = ("batch", "length", None, "embed")  # [B, S, K, D]


class EmbeddingMLP(nn.Module):
    """MLP(x) = RMSNorm(W₂ GELU(x W₁ + b₁) + b₂), hidden and output width `features`."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = GeluMLP(self.features, self.features, self.dtype, name="mlp")(x)
        return RMSNorm(dtype=self.dtype, name="norm")(h)


class AngleEmbedding(nn.Module):
    """E_δ = MLP(cos δ·e_start + sin δ·e_end): a slerp between two learned vectors, per frame."""

    features: int
    angle_dim: int = 256
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, delta: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",))
        e_start = self.param("e_start", init, (self.angle_dim,))
        e_end = self.param("e_end", init, (self.angle_dim,))
        delta = delta.astype(jnp.float32)[..., None]
        x = jnp.cos(delta) * e_start + jnp.sin(delta) * e_end
        return EmbeddingMLP(self.features, self.dtype, name="mlp")(x)


class RoformerLayer(nn.Module):
    """Pre-norm layer on merged columns h [B, K_MS, S, D]: self-attn along S, cross-attn, FFN.

    Self-attention runs per column ([B·K_MS, S, D]); cross-attention has no query-query
    interaction, so it runs on [B, K_MS·S, D] and projects each example's tokens once, not K_MS times.
    """

    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array, context: jax.Array, uncond: jax.Array | None) -> jax.Array:
        b, k, s, d = h.shape
        x = h.reshape(b * k, s, d)
        norm = lambda name, y: RMSNorm(dtype=self.dtype, name=name)(y)  # noqa: E731
        x = x + Attention(self.num_heads, dtype=self.dtype, name="self_attn")(norm("self_norm", x))
        y = norm("cross_norm", x)
        cross = Attention(self.num_heads, dtype=self.dtype, name="cross_attn")
        out = cross(y.reshape(b, k * s, d), context).reshape(b * k, s, d)
        if uncond is not None:
            out = jnp.where(jnp.repeat(uncond, k)[:, None, None], cross(y), out)
        x = x + out
        x = x + GeluMLP(self.mlp_dim, dtype=self.dtype, name="mlp")(norm("mlp_norm", x))
        return x.reshape(b, k, s, d)


def coarse_path(block: "DualPathBlock", h: jax.Array, context: jax.Array, uncond: jax.Array | None,
                merge_length: int) -> jax.Array:
    """H [B, S, K, D] → columns merged K → K_MS (means), the Roformer layers, repeated back to K."""
    b, s, k, d = h.shape
    group = k // merge_length
    coarse = h.reshape(b, s, merge_length, group, d).mean(3).transpose(0, 2, 1, 3)
    fields = (block.num_heads, block.mlp_dim, block.dtype)
    if block.scan_layers:
        stack = layer_stack(RoformerLayer, block.roformer_layers, 2, axis="sublayers")
        coarse, _ = stack(*fields, name="roformer")(coarse, context, uncond)
    else:
        for j in range(block.roformer_layers):
            coarse = RoformerLayer(*fields, name=f"roformer_{j}")(coarse, context, uncond)
    return jnp.repeat(coarse.transpose(0, 2, 1, 3), group, axis=2)


class DualPathBlock(nn.Module):
    """One block: H [B, S, K, D] → RMSNorm(H_f-in + FiLM(BiSRU(BiSRU(H_f-in)), m)).

    `merge_lengths`: the block's K_MS, or (blocks scanned by the DPD) every distinct K_MS of the stack,
    of which `choice` picks this block's: the coarse path is a `lax.switch` over them, all sharing the
    one set of parameters, so the fine path and each coarse variant compile once. `scan_layers`: the
    Roformer layers as one `nn.scan` too.
    """

    merge_lengths: tuple[int, ...]
    num_heads: int
    mlp_dim: int
    roformer_layers: int
    parallel_sru: bool = True
    dtype: Any = jnp.float32
    scan_layers: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, context: jax.Array, film: jax.Array, uncond: jax.Array | None,
                 choice: jax.Array | None = None) -> jax.Array:
        branches = [functools.partial(coarse_path, merge_length=m) for m in self.merge_lengths]
        if len(branches) == 1:
            coarse = branches[0](self, h, context, uncond)
        else:
            coarse = nn.switch(choice, branches, self, h, context, uncond)
        f_in = RMSNorm(dtype=self.dtype, name="fine_norm")(h + coarse)
        f = BiSRU(self.parallel_sru, self.dtype, name="sru_0")(f_in)
        f = BiSRU(self.parallel_sru, self.dtype, name="sru_1")(f)
        f_out = FiLM(self.dtype, name="film")(f, film[:, :, None, :])
        return nn.with_logical_constraint(RMSNorm(dtype=self.dtype, name="out_norm")(f_in + f_out), SEGMENTS)


def frame_tokens(e_st: jax.Array, length: int, uncond: jax.Array | None) -> jax.Array:
    """[B, T_ST, D] → [B, L, D]: each frame gets its token's embedding (zero where uncond)."""
    aligned = e_st[:, np.arange(length) * e_st.shape[1] // length]
    if uncond is None:
        return aligned
    return jnp.where(uncond[:, None, None], 0.0, aligned).astype(aligned.dtype)


def embed_inputs(module: nn.Module, z_noisy: jax.Array, delta: jax.Array,
                 tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The input stem every velocity network shares: (Linear(z_noisy) + E_δ, E_δ, E_ST).

    Called from a compact `__call__` of `module` (which has hidden_dim, angle_dim, vocab_size, dtype):
    the parameters live directly under that module, as if written inline.
    """
    d = module.hidden_dim
    e_delta = AngleEmbedding(d, module.angle_dim, module.dtype, name="angle_embed")(delta)
    table = module.param("token_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")), (module.vocab_size, d))
    e_st = EmbeddingMLP(d, module.dtype, name="token_mlp")(jnp.take(table, tokens, axis=0))
    e_st = nn.with_logical_constraint(e_st, ("batch", "length", "embed"))
    x = dense(d, ("latent", "embed"), module.dtype, use_bias=True, name="input")(z_noisy) + e_delta
    return x, e_delta, e_st


def default_merge_lengths(segment_length: int, num_blocks: int) -> tuple[int, ...]:
    """K_MS(i) = K / 2^min(i−1, N−i), i = 1…N: widest at both ends, narrowest in the middle."""
    return tuple(max(1, segment_length >> min(i, num_blocks - 1 - i)) for i in range(num_blocks))


class DPD(nn.Module):
    """(z_noisy [B, L, latent], δ [B, L], tokens int32 [B, T_ST], uncond [B] | None) → v̂ float32 [B, L, latent].

    Defaults are the paper's sizes (D 768, N 8, K 64, heads 12); the Roformer depth and FFN width are
    ours (3 layers per block, FFN 2560), chosen so `param_count()` is 295.6M vs the paper's 296.6M.
    """

    latent_dim: int = 16
    hidden_dim: int = 768
    num_blocks: int = 8
    segment_length: int = 64
    merge_lengths: tuple[int, ...] | None = None
    num_heads: int = 12
    roformer_layers: int = 3
    mlp_dim: int = 2560
    angle_dim: int = 256
    vocab_size: int = 1024
    parallel_sru: bool = True
    align_tokens: bool = True
    remat: bool = False
    dtype: Any = jnp.float32
    scan_layers: bool = False  # the blocks as one nn.scan (coarse paths switched by K_MS), Roformers nested
    # The network diffuses input_scale · z (VAE latents z): a gain read by the task and the samplers, not the layers
    input_scale: float = 1.0

    def resolved_merge_lengths(self) -> tuple[int, ...]:
        merge = self.merge_lengths or default_merge_lengths(self.segment_length, self.num_blocks)
        if len(merge) != self.num_blocks or any(m < 1 or self.segment_length % m for m in merge):
            raise ValueError(f"merge_lengths {merge} must be {self.num_blocks} divisors of "
                             f"segment_length={self.segment_length}")
        return tuple(merge)

    @nn.compact
    def __call__(
        self, z_noisy: jax.Array, delta: jax.Array, tokens: jax.Array, uncond: jax.Array | None = None
    ) -> jax.Array:
        length = z_noisy.shape[1]
        x, e_delta, e_st = embed_inputs(self, z_noisy, delta, tokens)
        if self.align_tokens:
            x = x + frame_tokens(e_st, length, uncond)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        h = nn.with_logical_constraint(segment(x, self.segment_length), SEGMENTS)

        # FiLM condition per segment: m_s = E_δ[⌊sL/S⌋] + mean_t E_ST[t] (the mean dropped if uncond).
        s = num_segments(length, self.segment_length)
        semantic = e_st.mean(axis=1)
        if uncond is not None:
            semantic = jnp.where(uncond[:, None], 0.0, semantic).astype(semantic.dtype)
        film = e_delta[:, np.arange(s) * length // s] + semantic[:, None, :]

        merges = self.resolved_merge_lengths()
        fields = (self.num_heads, self.mlp_dim, self.roformer_layers, self.parallel_sru, self.dtype, self.scan_layers)
        if self.scan_layers:
            choices = tuple(sorted(set(merges)))
            stack = layer_stack(DualPathBlock, self.num_blocks, 3, self.remat, num_scanned=1)
            h, _ = stack(choices, *fields, name="blocks")(h, e_st, film, uncond,
                                                          jnp.array([choices.index(m) for m in merges], jnp.int32))
        else:
            block = nn.remat(DualPathBlock) if self.remat else DualPathBlock
            for i, merge in enumerate(merges):
                h = block((merge,), *fields, name=f"block_{i}")(h, e_st, film, uncond)

        y = RMSNorm(dtype=self.dtype, name="out_norm")(overlap_add(h, length))
        y = dense(self.latent_dim, ("embed", "latent"), self.dtype, use_bias=True, name="output")(y)
        return nn.with_logical_constraint(y.astype(jnp.float32), ("batch", "length", "latent"))

    def param_count(self) -> int:
        """Closed-form parameter count (tested against `jax.eval_shape(init)`)."""
        d, f, c, a = self.hidden_dim, self.mlp_dim, self.latent_dim, self.angle_dim
        mlp = lambda n_in: n_in * d + d + d * d + d + d  # noqa: E731  EmbeddingMLP
        embeddings = 2 * a + mlp(a) + self.vocab_size * d + mlp(d)
        io = (c * d + d) + (d + d * c + c)  # input projection; output norm + projection
        roformer = 3 * d + 8 * d * d + (2 * d * f + f + d)  # 3 norms, 2 attentions, GELU FFN
        bisru = 2 * (3 * d * d + 3 * d) + (2 * d * d + d)  # two directions + output projection
        fine = 2 * d + 2 * bisru + (2 * d * d + 2 * d)  # 2 norms, 2 BiSRUs, FiLM
        return embeddings + io + self.num_blocks * (self.roformer_layers * roformer + fine)


class Condition(NamedTuple):
    """The DPD's conditioning, as the samplers' `cond` pytree."""

    tokens: jax.Array  # int32 [B, T_ST]
    uncond: jax.Array  # bool [B]


def velocity_fn(model: DPD, variables: Any) -> VelocityFn:
    """The samplers' velocity function for a DPD; call it inside the jitted sampler."""

    def fn(z: jax.Array, delta: jax.Array, cond: Condition) -> jax.Array:
        return model.apply(variables, z, delta, cond.tokens, cond.uncond)

    return fn


def guidance_conditions(tokens: jax.Array) -> tuple[Condition, Condition]:
    """(conditional, unconditional) for `classifier_free_guidance`: same tokens, uncond off/on."""
    batch = tokens.shape[0]
    return Condition(tokens, jnp.zeros(batch, bool)), Condition(tokens, jnp.ones(batch, bool))
