"""The training state: one pytree the loop shards, donates, checkpoints and restores."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    """`params`/`opt_state` are any pytrees (a GAN keeps generator and discriminator side by side).

    `bad_steps` counts skipped non-finite updates in total; `bad_streak` the current run of them.
    `ema` is the exponential moving average of `params` (same tree, same shardings) when
    `train.ema_decay > 0`, else None (no leaves: a state without EMA checkpoints as it always has).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    bad_steps: jax.Array
    bad_streak: jax.Array
    ema: Any = None

    @classmethod
    def create(cls, params: Any, opt_state: Any) -> "TrainState":
        zero = jnp.zeros((), jnp.int32)
        return cls(step=zero, params=params, opt_state=opt_state, bad_steps=zero, bad_streak=zero)


def overlay(tree: Mapping[str, Any], part: Mapping[str, Any]) -> dict[str, Any]:
    """`tree` (nested dicts) with the leaves of `part`, nested dicts along some of its paths, in their places."""
    out = dict(tree)
    for key, value in part.items():
        out[key] = overlay(tree[key], value) if isinstance(value, Mapping) and key in tree else value
    return out
