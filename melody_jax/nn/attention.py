"""Multi-head attention: self (rotary, causal or not) and cross, padding masks, and a KV cache.

The KV cache lives in Linen's `cache` collection. Initialise with `decode=True` on an input of the
full length to allocate it; then each call appends its keys/values at `cache_index`, so a prefix can
be pre-filled in one call and the rest decoded one token at a time inside a `jax.lax` loop. The cache
is stored heads-major, [B, H, S, D]: attention reads it in place as B·H contiguous [S, D] matrices,
whereas a [B, S, H, D] cache made XLA transpose all of it at every decode step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn import skinny
from melody_jax.nn.init import dense
from melody_jax.nn.rotary import apply_rotary


def causal_mask(q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
    """[1, 1, T, S] boolean: query i may see key j iff k_pos[j] <= q_pos[i]."""
    return (k_positions[None, :] <= q_positions[:, None])[None, None]


def padding_mask(key_valid: jnp.ndarray) -> jnp.ndarray:
    """[B, 1, 1, S] boolean from a key validity mask [B, S] (True = real token)."""
    return key_valid.astype(bool)[:, None, None, :]


def combine_masks(*masks: jnp.ndarray | None) -> jnp.ndarray | None:
    present = [m for m in masks if m is not None]
    if not present:
        return None
    out = present[0]
    for m in present[1:]:
        out = jnp.logical_and(out, m)
    return out


def cached_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None,
                     scale: float) -> jnp.ndarray:
    """q [B, T, H, D] against a heads-major cache k, v [B, H, S, D] → [B, T, H, D].

    The math of `jax.nn.dot_product_attention` (float32 scores and softmax), on the cache's layout.
    """
    scores = jnp.einsum("bthd,bhsd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        scores = jnp.where(mask, scores, -0.7 * jnp.finfo(jnp.float32).max)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bhsd->bthd", probs, v)


class Attention(nn.Module):
    """Multi-head attention; `context=None` means self-attention (rotary applied), else cross."""

    num_heads: int
    head_dim: int | None = None
    dtype: jnp.dtype = jnp.float32
    use_rotary: bool = True
    rotary_base: float = 10000.0
    use_bias: bool = False
    decode: bool = False
    implementation: str = "xla"  # jax.nn.dot_product_attention's: "xla", or "cudnn" (GPU flash kernel, bf16/fp16)

    @nn.compact
    def __call__(
        self,
        x: jnp.ndarray,
        context: jnp.ndarray | None = None,
        *,
        mask: jnp.ndarray | None = None,
        causal: bool = False,
        positions: jnp.ndarray | None = None,
    ) -> jnp.ndarray:
        """x [B, T, D]; context [B, S, Dc]; mask broadcastable to [B, H, T, S], True = attend.

        `positions` [T] or [B, T] (rotary, uncached self-attention) default to arange(T); when
        decoding they follow the cache index.
        """
        d_model = x.shape[-1]
        head_dim = self.head_dim or d_model // self.num_heads
        if self.head_dim is None and d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} does not divide embed_dim={d_model}")
        is_self = context is None
        kv_in = x if is_self else context
        qkv_names = ("embed", "heads", "kv")
        proj = lambda name, inp: dense(  # noqa: E731
            (self.num_heads, head_dim), qkv_names, self.dtype, use_bias=self.use_bias, name=name
        )(inp)
        act = ("batch", "length", "heads", "kv")
        q = nn.with_logical_constraint(proj("query", x), act)
        k = nn.with_logical_constraint(proj("key", kv_in), act)
        v = nn.with_logical_constraint(proj("value", kv_in), act)

        t = x.shape[1]
        if self.decode:  # `positions` is ignored: they follow the cache index
            if not is_self:
                raise ValueError("the KV cache is for self-attention; cross-attention keys are static")
            index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            q_pos = index.value + jnp.arange(t)
            if self.use_rotary:
                q, k = apply_rotary(q, q_pos, self.rotary_base), apply_rotary(k, q_pos, self.rotary_base)
            k, v = self._update_cache(k, v, index)
            scale = head_dim**-0.5

            def masked(q, k, v, _length=None):  # the whole cache, later positions masked
                return cached_attention(q, k, v, combine_masks(mask, causal_mask(q_pos, jnp.arange(k.shape[2]))),
                                        scale)

            if mask is None and skinny.attends(q, k, v):  # one query: the CPU kernel reads the filled cache only
                out = skinny.cache_attention(q, k, v, q_pos[-1] + 1, scale, masked)
            else:
                out = masked(q, k, v)
        else:
            if is_self and self.use_rotary:
                pos = jnp.arange(t) if positions is None else positions
                q, k = apply_rotary(q, pos, self.rotary_base), apply_rotary(k, pos, self.rotary_base)
            if causal:
                mask = combine_masks(mask, causal_mask(jnp.arange(t), jnp.arange(t)))
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=head_dim**-0.5,
                                               implementation=self.implementation)
        out = nn.with_logical_constraint(out, act)
        return dense(d_model, ("heads", "kv", "embed"), self.dtype, axis=(-2, -1),
                     use_bias=self.use_bias, name="out")(out)

    def _update_cache(self, k: jnp.ndarray, v: jnp.ndarray, index) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Writes this call's (rotated) keys/values at the cache index; returns the whole cache [B, H, S, D].

        The first (allocation) pass sizes the cache from its input and attends causally as usual.
        """
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        is_initialized = self.has_variable("cache", "cached_key")
        cached_k = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_v = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        if not is_initialized:
            return k, v
        start = (0, 0, index.value, 0)
        cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
        cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
        index.value = index.value + k.shape[2]
        layout = ("batch", "heads", "length", "kv")
        return (nn.with_logical_constraint(cached_k.value, layout),
                nn.with_logical_constraint(cached_v.value, layout))
