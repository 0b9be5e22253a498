"""Angle-diffusion samplers: generation, continuation (paper Algorithm 2) and inpainting (DESIGN §4.6).

All three are one masked denoising loop: frames where `mask` is true are denoised from
π/2 to 0; the others are known, held at angle 0 and re-inserted after every step. Every loop
runs inside `jax.lax.scan`, so a sampler is pure and compiles to one XLA program; the model is
a `velocity_fn(z_noisy, delta, cond)` (see `guidance.VelocityFn`, which also adds CFG). To jit,
close over the model's params inside the jitted function, or pass `velocity_fn` as static.
Latents go in and come out in the VAE's units; with `scale` the loop runs on scale · z, the space a
velocity network trained with that input scale diffuses (unit-variance noise there).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from melody_jax.diffusion.angles import Schedule, angle_step, sampling_angles
from melody_jax.diffusion.guidance import VelocityFn


def noise_like(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """ε of `shape` [B, ...] from one key, or from one key per row (`key` of shape [B]): then a row's
    noise does not depend on the batch it is drawn in, so batched sampling equals one-by-one."""
    if key.ndim == 0:
        return jax.random.normal(key, shape, dtype)
    return jax.vmap(lambda k: jax.random.normal(k, shape[1:], dtype))(key)


def split_keys(key: jax.Array, num: int) -> jax.Array:
    """`num` keys on a leading axis, from one key or from per-row keys [B] (→ [num, B])."""
    if key.ndim == 0:
        return jax.random.split(key, num)
    return jnp.swapaxes(jax.vmap(lambda k: jax.random.split(k, num))(key), 0, 1)


def _denoise(
    velocity_fn: VelocityFn,
    z: jax.Array,
    known: jax.Array,
    mask: jax.Array,
    cond: Any,
    num_steps: int,
    schedule: Schedule,
    scale: float,
) -> jax.Array:
    """Denoises the frames of z [B, L, D] where mask [B, L] is true; the rest stay `known`.

    The loop runs on scale · z; the generated frames come back in VAE units clipped to [−1, 1] (its
    latent range), known frames bit-for-bit.
    """
    deltas, omegas = sampling_angles(num_steps, schedule)
    frame_mask = mask[..., None]
    known_scaled = known * scale

    def step(z: jax.Array, angles: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        delta_t, omega_t = angles
        delta = jnp.where(mask, delta_t, 0.0)
        v_hat = velocity_fn(z, delta, cond).astype(z.dtype)
        return jnp.where(frame_mask, angle_step(z, v_hat, omega_t), known_scaled), None

    z, _ = jax.lax.scan(step, z * scale, (jnp.asarray(deltas), jnp.asarray(omegas)))
    return jnp.where(frame_mask, jnp.clip(z / scale, -1.0, 1.0), known)


def generate(
    velocity_fn: VelocityFn,
    key: jax.Array,
    cond: Any,
    shape: tuple[int, int, int],
    *,
    num_steps: int,
    schedule: Schedule = "paper",
    scale: float = 1.0,
) -> jax.Array:
    """Samples latents [B, L, D] from scale · z_{π/2} = ε = noise_like(key, shape) (key: one, or one per row)."""
    noise = noise_like(key, shape) / scale
    mask = jnp.ones(shape[:2], bool)
    return _denoise(velocity_fn, noise, jnp.zeros_like(noise), mask, cond, num_steps, schedule, scale)


def inpaint(
    velocity_fn: VelocityFn,
    key: jax.Array,
    z: jax.Array,
    mask: jax.Array,
    cond: Any,
    *,
    num_steps: int,
    schedule: Schedule = "paper",
    scale: float = 1.0,
) -> jax.Array:
    """Fills the frames of z [B, L, D] where mask ([B, L] or [L], bool) is true, keeps the rest.

    The region starts from ε = noise_like(key, z.shape) at angle π/2 (in the scaled space).
    """
    mask = jnp.broadcast_to(mask, z.shape[:2])
    noise = noise_like(key, z.shape, z.dtype) / scale
    start = jnp.where(mask[..., None], noise, z)
    return _denoise(velocity_fn, start, z, mask, cond, num_steps, schedule, scale)


def continuation_chunk_length(length: int, num_chunks: int) -> int:
    """L_M = ⌈L/M⌉: how many new frames each continuation step adds to a window of L frames."""
    return math.ceil(length / num_chunks)


def continue_window(
    velocity_fn: VelocityFn,
    key: jax.Array,
    window: jax.Array,
    cond: Any,
    *,
    chunk_length: int,
    num_steps: int,
    schedule: Schedule = "paper",
    scale: float = 1.0,
) -> jax.Array:
    """One step of Algorithm 2: drops the first `chunk_length` frames of window [B, L, D],
    appends as many new frames (from ε = noise_like(key, [B, chunk_length, D])) and
    denoises only those, with angle vector [0]×(L−L_M) ⊕ [δ_t]×L_M. Returns the new window.
    """
    batch, length, dim = window.shape
    if not 0 < chunk_length < length:
        raise ValueError(f"chunk_length must be in (0, {length}), got {chunk_length}")
    noise = noise_like(key, (batch, chunk_length, dim), window.dtype) / scale
    start = jnp.concatenate([window[:, chunk_length:], noise], axis=1)
    mask = jnp.broadcast_to(jnp.arange(length) >= length - chunk_length, (batch, length))
    return _denoise(velocity_fn, start, start, mask, cond, num_steps, schedule, scale)


def continue_latents(
    velocity_fn: VelocityFn,
    key: jax.Array,
    z: jax.Array,
    conds: Any,
    *,
    window_length: int,
    chunk_length: int,
    num_steps: int,
    schedule: Schedule = "paper",
    scale: float = 1.0,
) -> jax.Array:
    """Extends latents z [B, L0, D] by N·chunk_length frames, for any N ("infinite" continuation).

    `conds` is the conditioning of each new window, stacked on a leading axis of size N (e.g. the
    semantic tokens of every window, which the LM produces from its own tokens alone, so they
    can be made before any latent). The window is the last `window_length` frames of z.
    Returns [B, L0 + N·chunk_length, D] whose first L0 frames are z unchanged.
    """
    if z.shape[1] < window_length:
        raise ValueError(f"need at least window_length={window_length} frames, got {z.shape[1]}")
    num_windows = jax.tree.leaves(conds)[0].shape[0]

    def step(window: jax.Array, inputs: tuple[jax.Array, Any]) -> tuple[jax.Array, jax.Array]:
        step_key, cond = inputs
        window = continue_window(
            velocity_fn, step_key, window, cond,
            chunk_length=chunk_length, num_steps=num_steps, schedule=schedule, scale=scale,
        )
        return window, window[:, -chunk_length:]

    keys = split_keys(key, num_windows)
    _, chunks = jax.lax.scan(step, z[:, -window_length:], (keys, conds))
    new = jnp.moveaxis(chunks, 0, 1).reshape(z.shape[0], num_windows * chunk_length, z.shape[2])
    return jnp.concatenate([z, new], axis=1)
