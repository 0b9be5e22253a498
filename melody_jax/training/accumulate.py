"""Gradient accumulation inside the jitted step: the global batch as `k` micro-batches in `lax.scan`.

Memory then follows the micro-batch (activations of one micro-batch live at a time) while the
update is that of the whole batch: every stage's loss is a mean over examples, so the mean of `k`
equal micro-batch means is the batch mean. Micro-batch j takes rows j, j + k, j + 2k, … so every
device contributes its own rows to every micro-batch and nothing moves between devices (the loop
requires batch / k to divide over data × fsdp). Micro-batch j draws its randomness from
`fold_in(rng, j)`. A batch's "frozen" entry (parameters of frozen stages) goes whole to each.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

Batch = dict[str, Any]


def steps(config: ml_collections.ConfigDict) -> int:
    """`train.grad_accum_steps` (1 = off); configs written before it existed have none."""
    return int(config.train.get("grad_accum_steps", 1))


def split(batch: Batch, k: int) -> Batch:
    """`[B, …]` leaves → `[k, B / k, …]`, micro-batch j holding rows j, j + k, …."""
    def one(x):
        return jnp.moveaxis(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 1, 0)

    return {key: jax.tree.map(one, v) for key, v in batch.items() if key != "frozen"}


def accumulate(fn: Callable[[Any, Batch, jax.Array], tuple[Any, Any]], carry: Any, batch: Batch, rng: jax.Array,
               k: int) -> tuple[Any, Any]:
    """`fn(carry, batch, rng) → (carry, out)` over k micro-batches in order; (last carry, mean of `out`)."""
    if k <= 1:
        return fn(carry, batch, rng)
    micro = split(batch, k)
    extra = {key: v for key, v in batch.items() if key == "frozen"}
    first = jax.tree.map(lambda x: x[0], micro)
    _, out_shape = jax.eval_shape(fn, carry, {**first, **extra}, rng)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.result_type(s.dtype, jnp.float32)), out_shape)

    def body(state, xs):
        c, total = state
        j, mb = xs
        c, out = fn(c, {**mb, **extra}, jax.random.fold_in(rng, j))
        return (c, jax.tree.map(jnp.add, total, out)), None

    (carry, total), _ = jax.lax.scan(body, (carry, zeros), (jnp.arange(k), micro))
    return carry, jax.tree.map(lambda t, s: (t / k).astype(s.dtype) if jnp.issubdtype(s.dtype, jnp.inexact)
                               else t / k, total, out_shape)


def value_and_grad(loss: Callable[..., tuple[jax.Array, Any]], params: Any, batch: Batch, rng: jax.Array, k: int,
                   *args: Any) -> tuple[tuple[jax.Array, Any], Any]:
    """`jax.value_and_grad(loss, has_aux=True)(params, batch, rng, *args)`, accumulated over k micro-batches."""
    grad_fn = jax.value_and_grad(loss, has_aux=True)
    return accumulate(lambda c, b, r: (c, grad_fn(params, b, r, *args)), None, batch, rng, k)[1]
