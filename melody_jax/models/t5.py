"""The T5 encoder (t5-base and the like), the text tower of the public MusicGen checkpoints.

It differs from the project's other encoders in three ways that parity with transformers needs:
pre-norm RMS norms with eps 1e-6 and no bias anywhere; attention scores without the 1/√d scaling;
and positions only as a learnt bias per head over bucketed relative distances, computed once from
block 0's table and added in every layer. The feed-forward is ReLU (`feed_forward_proj="relu"`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from melody_jax.nn.init import dense, embed_tokens
from melody_jax.nn.norms import RMSNorm
from melody_jax.nn.scan import layer_stack

ACT = ("batch", "length", "embed")


def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """int32 [L, L] bidirectional buckets of key − query distances, as T5 computes them (float32 logs)."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    rel = np.abs(rel)
    exact = half // 2
    scaled = (np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(exact))
              / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
    large = np.minimum(exact + scaled.astype(np.int64), half - 1)
    return (buckets + np.where(rel < exact, rel, large)).astype(np.int32)


class T5Block(nn.Module):
    """x + Attn(rms x, bias); x + W_o ReLU(W_i rms x)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        h = RMSNorm(self.epsilon, self.dtype, name="attn_norm")(x)
        proj = lambda name: dense((self.num_heads, self.head_dim), ("embed", "heads", "kv"), self.dtype,  # noqa: E731
                                  name=name)(h)
        q, k, v = proj("query"), proj("key"), proj("value")
        scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) + bias  # no 1/√d
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = nn.with_logical_constraint(jnp.einsum("bhts,bshd->bthd", probs, v), ("batch", "length", "heads", "kv"))
        x = x + dense(x.shape[-1], ("heads", "kv", "embed"), self.dtype, axis=(-2, -1), name="out")(out)
        h = RMSNorm(self.epsilon, self.dtype, name="mlp_norm")(x)
        h = jax.nn.relu(dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="wi")(h))
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        x = x + dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="wo")(h)
        return nn.with_logical_constraint(x, ACT)


class T5Encoder(nn.Module):
    """Token ids `[B, L]` and their mask → last hidden state `[B, L, embed_dim]` (float32).

    `scan_layers`: the blocks as one `nn.scan` (`melody_jax.nn.scan`), parameters `layers/…`.
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_buckets: int = 32
    max_distance: int = 128
    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        x = embed_tokens(self, "token_embedding", tokens, self.vocab_size, self.embed_dim, self.dtype)
        relative = self.param("relative_bias", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                            (None, "heads")),
                              (self.num_buckets, self.num_heads))
        buckets = relative_buckets(tokens.shape[1], self.num_buckets, self.max_distance)
        bias = jnp.take(relative, buckets, axis=0).transpose(2, 0, 1)[None]  # [1, H, L, L], shared by every block
        bias = jnp.where(mask.astype(bool)[:, None, None, :], bias, jnp.finfo(jnp.float32).min)
        fields = (self.num_heads, self.head_dim, self.mlp_dim, self.epsilon, self.dtype)
        if self.scan_layers:
            x, _ = layer_stack(T5Block, self.num_layers, 1, self.remat)(*fields, name="layers")(x, bias)
        else:
            block = nn.remat(T5Block) if self.remat else T5Block
            for i in range(self.num_layers):
                x = block(*fields, name=f"layers_{i}")(x, bias)
        return RMSNorm(self.epsilon, self.dtype, name="final_norm")(x).astype(jnp.float32)
