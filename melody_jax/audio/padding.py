"""Padding masks from samples to frames: a crop shorter than its batch is padded, and a model's frames over
the padding must not count in a loss. Here rather than beside the input pipeline, whose module imports
TensorFlow, so that the tasks (and sampling, which loads them) do not.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def frame_mask(mask: jax.Array, hop: int, frames: int) -> jax.Array:
    """[B, frames]: 1 where all `hop` samples of a frame are real in `mask [B, samples]` (0 past its end), so
    a model's frames that are partly or wholly padding never count in a loss."""
    need = frames * hop
    mask = jnp.asarray(mask, jnp.float32)[:, :need]
    mask = jnp.pad(mask, ((0, 0), (0, need - mask.shape[1])))
    return mask.reshape(mask.shape[0], frames, hop).min(-1)
