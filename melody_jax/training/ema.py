"""Weight EMA kept in the train state: `ema ← d·ema + (1 − d)·params` after every applied step.

Started equal to the initial (or `init_from`) parameters, so after N steps
`ema_N = d^N p_0 + (1 − d) Σ_k d^(N−k) p_k` (no bias correction: the start is a real model, not zeros).
It is a second copy of `params` in the state, so it is sharded, donated, checkpointed and restored
with it; a skipped (non-finite) step leaves it untouched like everything else. Non-float leaves
(counters in a generator's state) are copied, not averaged.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from melody_jax.training.state import TrainState


def decay(config: ml_collections.ConfigDict) -> float:
    """`train.ema_decay` (0 = off); configs written before it existed have none."""
    return float(config.train.get("ema_decay", 0.0))


def attach(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
    """The state with `ema = params` when EMA is on (boxed params keep their logical axes)."""
    return state.replace(ema=state.params) if decay(config) > 0 else state


def update(state: TrainState, d: float) -> TrainState:
    if state.ema is None:
        return state

    def mix(e, p):
        return (d * e + (1.0 - d) * p).astype(p.dtype) if jnp.issubdtype(p.dtype, jnp.inexact) else p

    return state.replace(ema=jax.tree.map(mix, state.ema, state.params))


def weights(state: TrainState) -> Any:
    """What evaluation and export use: the EMA when the state keeps one, else the raw parameters."""
    return state.params if state.ema is None else state.ema



def as_saved(abstract: TrainState, meta: dict[str, Any]) -> TrainState:
    """The abstract state as a checkpoint holds it: with an EMA iff its meta says so (older ones: without)."""
    return abstract.replace(ema=abstract.params if meta.get("ema") else None)


def match_config(state: TrainState, config: ml_collections.ConfigDict, shardings: TrainState) -> TrainState:
    """A restored state made to fit the run: an EMA started from the parameters if the checkpoint had
    none, or dropped if this run keeps none. A copy, so `params` and `ema` never share a donated buffer."""
    if decay(config) > 0 and state.ema is None:
        return state.replace(ema=jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(
            state.params))
    return state if decay(config) > 0 else state.replace(ema=None)
