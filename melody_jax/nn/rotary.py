"""Rotary position embedding (RoFormer), rotate-half layout: positions enter attention as rotations."""
from __future__ import annotations

import jax.numpy as jnp


def rotary_angles(positions: jnp.ndarray, head_dim: int, base: float = 10000.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin tables [..., T, head_dim // 2] for integer or float positions [..., T]."""
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    inv_freq = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jnp.ndarray, positions: jnp.ndarray, base: float = 10000.0) -> jnp.ndarray:
    """Rotates x [B, T, H, D] by its positions [B, T] (or [T]); pairs are (i, i + D/2)."""
    cos, sin = rotary_angles(positions, x.shape[-1], base)
    if cos.ndim == 2:  # [T, D/2] → broadcast over batch
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
