"""Classifier-free guidance (DESIGN §4.5, §6): the one combine rule, and its wrapper for velocity models."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

# velocity_fn(z_noisy [B, L, D], delta [B, L], cond) -> v̂ [B, L, D]; cond is any pytree whose
# leaves have the batch as their leading axis.
VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def guide(conditional: jax.Array, unconditional: jax.Array, scale: float | jax.Array) -> jax.Array:
    """u + s·(c − u) for the DPD's velocities and MusicGen's logits alike, written c + (s − 1)·(c − u)
    so that s = 1 gives exactly c."""
    return conditional + (scale - 1) * (conditional - unconditional)


def classifier_free_guidance(velocity_fn: VelocityFn, scale: float | jax.Array) -> VelocityFn:
    """Wraps `velocity_fn` so that it takes cond = (conditional, unconditional) pytrees.

    Both branches run as ONE batch of 2B (one model call per step, better device use than two).
    The result is `guide(v_c, v_u, scale)`.
    """

    def guided(z: jax.Array, delta: jax.Array, cond: tuple[Any, Any]) -> jax.Array:
        conditional, unconditional = cond
        both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), conditional, unconditional)
        v = velocity_fn(jnp.concatenate([z, z]), jnp.concatenate([delta, delta]), both)
        v_c, v_u = jnp.split(v, 2)
        return guide(v_c, v_u, scale)

    return guided
