"""Half-overlapping segmentation and overlap-add (DESIGN §4.5 steps 4 and 6).

[B, L, D] is zero-padded at the end to P = ⌈L/(K/2)⌉·K/2 frames, then by K/2 on each side, and
cut into S = P/(K/2) + 1 segments of length K with hop K/2 (L = 2500, K = 64: P = 2528, S = 80).
Every one of the original frames then lies in exactly two segments, so `overlap_add` averages
the two copies and `overlap_add(segment(x, K), L) == x` exactly. Both work on blocks of K/2
frames (reshape + concatenate), with no gather.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _hop(segment_length: int) -> int:
    if segment_length < 2 or segment_length % 2:
        raise ValueError(f"segment_length must be even and >= 2, got {segment_length}")
    return segment_length // 2


def num_segments(length: int, segment_length: int) -> int:
    """S for a sequence of `length` frames."""
    return math.ceil(length / _hop(segment_length)) + 1


def segment(x: jax.Array, segment_length: int) -> jax.Array:
    """[B, L, D] → [B, S, K, D], segment s covering padded frames [s·K/2, s·K/2 + K)."""
    hop = _hop(segment_length)
    batch, length, dim = x.shape
    blocks = num_segments(length, segment_length) + 1
    x = jnp.pad(x, ((0, 0), (hop, blocks * hop - length - hop), (0, 0)))
    x = x.reshape(batch, blocks, hop, dim)
    return jnp.concatenate([x[:, :-1], x[:, 1:]], axis=2)


def overlap_add(segments: jax.Array, length: int) -> jax.Array:
    """[B, S, K, D] → [B, L, D]: each frame is the mean of its two overlapping copies."""
    batch, count, segment_length, dim = segments.shape
    hop = _hop(segment_length)
    if count != num_segments(length, segment_length):
        raise ValueError(f"{count} segments of {segment_length} do not cover length {length}")
    first, second = segments[:, :, :hop], segments[:, :, hop:]
    # Block j (j = 1…S−1, the unpadded region's blocks) = first half of segment j + second of j−1.
    blocks = (first[:, 1:] + second[:, :-1]) / 2
    return blocks.reshape(batch, (count - 1) * hop, dim)[:, :length]
