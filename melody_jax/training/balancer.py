"""audiocraft's loss balancer: each loss's gradient with respect to a model output, rescaled to a share.

Given losses l_i(y) of one output y, the gradient sent back into the model is
    G = Σ_i total_norm · (w_i / Σ_j w_j) · g_i / avg‖g_i‖,   g_i = ∂l_i/∂y,
where avg is a bias-corrected exponential moving average (decay `ema_decay`) of ‖g_i‖ — per example
(the norm over every axis but the first, averaged over the batch) or over the whole batch. So the
weights act as shares of the gradient, whatever the losses' own scales: with steady norms, loss i
contributes a gradient of norm total_norm · w_i / Σ w, and multiplying a loss by a constant changes
nothing. The state is `{"total": {name: EMA numerator}, "fix": EMA denominator}` (all zeros at start).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

EPSILON = 1e-12


def init_state(names) -> dict:
    return {"total": {n: jnp.zeros((), jnp.float32) for n in names}, "fix": jnp.zeros((), jnp.float32)}


def gradient_norm(grad: jax.Array, per_example: bool = True) -> jax.Array:
    """‖g‖ over every axis but the batch axis, averaged over the batch (or ‖g‖ of the whole batch)."""
    if per_example:
        return jnp.mean(jnp.sqrt(jnp.sum(jnp.square(grad.reshape(grad.shape[0], -1)), axis=-1)))
    return jnp.sqrt(jnp.sum(jnp.square(grad)))


def balance(grads: Mapping[str, jax.Array], weights: Mapping[str, float], state: dict, *, total_norm: float = 1.0,
            ema_decay: float = 0.999, per_example: bool = True) -> tuple[jax.Array, dict, dict[str, jax.Array]]:
    """(balanced gradient G, new state, {name: scale applied to g_name}) for the partial gradients `grads`."""
    fix = state["fix"] * ema_decay + 1.0
    totals = {n: state["total"][n] * ema_decay + gradient_norm(g, per_example) for n, g in grads.items()}
    weight_sum = sum(weights[n] for n in grads)
    scales = {n: weights[n] / weight_sum * total_norm / (EPSILON + totals[n] / fix) for n in grads}
    out = sum(scales[n] * g for n, g in grads.items())
    return out, {"total": totals, "fix": fix}, scales
