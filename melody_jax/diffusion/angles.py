"""Diffusion in angles (DESIGN §4.5): noising, velocity targets, multi-chunk angles, schedules.

A latent at angle δ is the point cos δ·z + sin δ·ε on the circle between data (δ = 0) and noise
(δ = π/2). Angles are per frame (`delta` is [B, L]), so different chunks of one example can sit at
different noise levels; every function broadcasts an angle of shape [...] over the trailing
latent axis of a [..., D] tensor (a scalar angle works too).
"""
from __future__ import annotations

import math
from typing import Literal, NamedTuple, get_args

import jax
import jax.numpy as jnp
import numpy as np

HALF_PI = math.pi / 2

Schedule = Literal["paper", "uniform"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)  # the paper's proposed one, and its ablation


def _trig(angle: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos and sin of an angle, expanded over the latent axis and cast to the latent dtype."""
    angle = jnp.asarray(angle, jnp.float32)[..., None]
    return jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)


def add_noise(z: jax.Array, eps: jax.Array, delta: jax.Array) -> jax.Array:
    """z_δ = cos δ·z + sin δ·ε."""
    c, s = _trig(delta, z.dtype)
    return c * z + s * eps


def velocity(z: jax.Array, eps: jax.Array, delta: jax.Array) -> jax.Array:
    """The regression target v = cos δ·ε − sin δ·z = dz_δ/dδ."""
    c, s = _trig(delta, z.dtype)
    return c * eps - s * z


def predict_clean(z_delta: jax.Array, v_hat: jax.Array, delta: jax.Array) -> jax.Array:
    """ẑ = cos δ·z_δ − sin δ·v̂ (rotating z_δ back by δ along the predicted velocity)."""
    c, s = _trig(delta, z_delta.dtype)
    return c * z_delta - s * v_hat


def predict_noise(z_delta: jax.Array, v_hat: jax.Array, delta: jax.Array) -> jax.Array:
    """ε̂ = sin δ·z_δ + cos δ·v̂ (the orthogonal complement of `predict_clean`)."""
    c, s = _trig(delta, z_delta.dtype)
    return s * z_delta + c * v_hat


def angle_step(z_delta: jax.Array, v_hat: jax.Array, omega: jax.Array) -> jax.Array:
    """One sampling step z_{δ−ω} = cos ω·z_δ − sin ω·v̂: exact if v̂ is the true velocity."""
    c, s = _trig(omega, z_delta.dtype)
    return c * z_delta - s * v_hat


def chunk_boundaries(length: int, num_chunks: int, chunk_length: int | None = None) -> np.ndarray:
    """Chunk edges for m = 0…M (static, numpy): L_m = ⌊m·L/M⌋, or with `chunk_length` C the last M − 1
    chunks C frames each, laid from the end (L − (M − m)·C), the first one taking the rest."""
    if not 1 <= num_chunks <= length:
        raise ValueError(f"num_chunks must be in [1, {length}], got {num_chunks}")
    if chunk_length is None:
        return np.arange(num_chunks + 1) * length // num_chunks
    if chunk_length < 1 or (num_chunks - 1) * chunk_length >= length:
        raise ValueError(f"{num_chunks - 1} chunks of {chunk_length} frames leave none of {length} for the first")
    return np.concatenate([[0], length - np.arange(num_chunks - 1, -1, -1) * chunk_length])


def chunk_index(length: int, num_chunks: int, chunk_length: int | None = None) -> np.ndarray:
    """For each frame, the chunk it belongs to: int [L]."""
    edges = chunk_boundaries(length, num_chunks, chunk_length)
    return np.searchsorted(edges, np.arange(length), side="right") - 1


def multi_chunk_angles(key: jax.Array, batch: int, length: int, num_chunks: int,
                       chunk_length: int | None = None, continuation_share: float = 0.0) -> jax.Array:
    """Per-frame angles [B, L]: δ_m ~ U[0, π/2] drawn independently per chunk and example; a
    `continuation_share` of the examples instead get a continuation step's vector (Algorithm 2): the
    first M − 1 chunks clean (δ = 0), the last one at its drawn angle."""
    per_chunk = jax.random.uniform(key, (batch, num_chunks), jnp.float32, 0.0, HALF_PI)
    if continuation_share > 0:
        steps = jax.random.bernoulli(jax.random.fold_in(key, 1), continuation_share, (batch, 1))
        per_chunk = jnp.where(steps & (jnp.arange(num_chunks) < num_chunks - 1), 0.0, per_chunk)
    return per_chunk[:, chunk_index(length, num_chunks, chunk_length)]


class NoisyBatch(NamedTuple):
    """A training example for the velocity model: input, its angles and the MSE target."""

    z_noisy: jax.Array  # [B, L, D]
    delta: jax.Array  # [B, L]
    target: jax.Array  # [B, L, D]


def multi_chunk_noising(key: jax.Array, z: jax.Array, num_chunks: int, chunk_length: int | None = None,
                        continuation_share: float = 0.0) -> NoisyBatch:
    """Noises each chunk of clean latents z [B, L, D] at its own random angle (multi-chunk training;
    `continuation_share` as in `multi_chunk_angles`)."""
    angle_key, noise_key = jax.random.split(key)
    batch, length = z.shape[:2]
    delta = multi_chunk_angles(angle_key, batch, length, num_chunks, chunk_length, continuation_share)
    eps = jax.random.normal(noise_key, z.shape, z.dtype)
    return NoisyBatch(add_noise(z, eps, delta), delta, velocity(z, eps, delta))


def angle_steps(num_steps: int, schedule: Schedule = "paper") -> np.ndarray:
    """Step sizes ω in sampling order (t = T…1), summing to π/2.

    `paper`: ω_t = π/(6T) + 2πt/(3T(T+1)), largest first, since early steps (near pure noise)
    can move further; `uniform`: ω_t = π/(2T), the paper's ablation baseline.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = np.arange(num_steps, 0, -1, dtype=np.float64)
    if schedule == "paper":
        return math.pi / (6 * num_steps) + 2 * math.pi * t / (3 * num_steps * (num_steps + 1))
    if schedule == "uniform":
        return np.full(num_steps, math.pi / (2 * num_steps))
    raise ValueError(f"unknown angle schedule {schedule!r}; expected one of {SCHEDULES}")


def sampling_angles(num_steps: int, schedule: Schedule = "paper") -> tuple[np.ndarray, np.ndarray]:
    """(δ_t, ω_t) per step, float32: the current angle and the step, from π/2 down to exactly 0.

    Angles are accumulated in float64 and the last step is set to land on 0, so rounding never
    leaves residual noise in the final sample.
    """
    omegas = angle_steps(num_steps, schedule)
    deltas = HALF_PI - np.concatenate([[0.0], np.cumsum(omegas)])
    deltas[-1] = 0.0
    return deltas[:-1].astype(np.float32), (deltas[:-1] - deltas[1:]).astype(np.float32)
