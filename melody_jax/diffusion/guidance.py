"""Classifier-free guidance for velocity models (DESIGN §4.5)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# velocity_fn(z_noisy [B, L, D], delta [B, L], cond) -> v̂ [B, L, D]; cond is any pytree whose
# leaves have the batch as their leading axis.
VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def classifier_free_guidance(velocity_fn: VelocityFn, scale: float | jax.Array) -> VelocityFn:
    """Wraps `velocity_fn` so that it takes cond = (conditional, unconditional) pytrees.

    Both branches run as ONE batch of 2B (one model call per step, better device use than two).
    The result is v_c + (s − 1)·(v_c − v_u), which equals v_u + s·(v_c − v_u) but is exactly v_c
    at s = 1.
    """

    def guided(z: jax.Array, delta: jax.Array, cond: tuple[Any, Any]) -> jax.Array:
        conditional, unconditional = cond
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), conditional, unconditional)
        v = velocity_fn(jnp.concatenate([z, z]), jnp.concatenate([delta, delta]), both)
        v_c, v_u = jnp.split(v, 2)
        return v_c + (scale - 1) * (v_c - v_u)

    return guided
