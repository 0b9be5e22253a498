"""Simple recurrent units (Lei et al., 2018), the fine path of the DPD network (DESIGN §4.5).

The gates come from the input only (original SRU, not SRU++'s c_{t−1} peephole), so
c_t = f_t ⊙ c_{t−1} + (1 − f_t) ⊙ x̃_t is a linear recurrence c_t = a_t c_{t−1} + b_t and runs as
a `jax.lax.associative_scan` in O(log T) depth; `parallel=False` selects the sequential
`jax.lax.scan` reference. Inputs are [..., T, D]; the recurrence runs along axis −2.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.init import dense


def linear_recurrence(a: jax.Array, b: jax.Array, parallel: bool = True) -> jax.Array:
    """c_t = a_t ⊙ c_{t−1} + b_t with c_{−1} = 0, along axis −2 of [..., T, D]."""
    if parallel:

        def combine(left, right):
            a_l, b_l = left
            a_r, b_r = right
            return a_l * a_r, a_r * b_l + b_r

        return jax.lax.associative_scan(combine, (a, b), axis=a.ndim - 2)[1]

    def step(c, ab):
        c = ab[0] * c + ab[1]
        return c, c

    ab = (jnp.moveaxis(a, -2, 0), jnp.moveaxis(b, -2, 0))
    _, c = jax.lax.scan(step, jnp.zeros_like(ab[1][0]), ab)
    return jnp.moveaxis(c, 0, -2)


class SRU(nn.Module):
    """One unidirectional SRU layer of width D (= the input width, for the highway connection).

    x̃, f, r = x W + b (one [D, 3, D] projection); c_t = f_t c_{t−1} + (1 − f_t) x̃_t;
    h_t = r_t c_t + (1 − r_t) x_t. Parameters: 3D² + 3D.
    """

    parallel: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        proj = dense((3, dim), ("embed", None, "mlp"), self.dtype, use_bias=True, name="proj")(x)
        x_tilde, f, r = (proj[..., i, :] for i in range(3))
        f, r = nn.sigmoid(f), nn.sigmoid(r)
        # The recurrence multiplies up to T gates: keep it in float32 whatever the compute dtype.
        a, b = f.astype(jnp.float32), ((1 - f) * x_tilde).astype(jnp.float32)
        c = linear_recurrence(a, b, self.parallel).astype(self.dtype)
        return r * c + (1 - r) * x.astype(self.dtype)


class BiSRU(nn.Module):
    """Bidirectional SRU: a forward and a time-reversed SRU, concatenated and projected back to D.

    Concatenate-then-project (as in DPRNN's BiLSTM) rather than summing, so the layer can weigh
    the two directions per channel. Parameters: 2·(3D² + 3D) + 2D² + D.
    """

    parallel: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        forward = SRU(self.parallel, self.dtype, name="forward")(x)
        backward = jnp.flip(SRU(self.parallel, self.dtype, name="backward")(jnp.flip(x, -2)), -2)
        both = jnp.concatenate([forward, backward], axis=-1)
        return dense(x.shape[-1], ("mlp", "embed"), self.dtype, use_bias=True, name="out")(both)
