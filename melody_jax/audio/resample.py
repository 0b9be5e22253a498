"""Rational-ratio resampling in JAX: a polyphase windowed-sinc filter as one strided conv.

A frozen tower trained at another rate (HuBERT at 16 kHz) runs inside the jitted steps of stages
that hold 24-kHz audio, so the resampler must be traceable. Upsampling by L, low-passing at the
lower Nyquist and keeping every M-th sample is computed in polyphase form: each block of M input
samples gives L outputs, output phase r filtering the input with every L-th tap of the filter (from
offset r·M), so the conv has stride M, L output channels and no zero-stuffed input. The
Kaiser-windowed sinc (β 8.6, `zeros` zero crossings each side) leaves ~−90 dB of aliasing, well
below what a tokenizer can tell; the signal is zero-extended at the edges.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def _filter(up: int, down: int, zeros: int) -> np.ndarray:
    """Windowed-sinc low-pass at the upsampled rate, gain `up` (the zero-stuffing's loss)."""
    cutoff = 0.5 / max(up, down)  # cycles per upsampled sample
    half = zeros * max(up, down)
    n = np.arange(-half, half + 1)
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.kaiser(2 * half + 1, 8.6)
    return (up * h / h.sum()).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _phases(up: int, down: int, zeros: int) -> tuple[np.ndarray, int]:
    """(kernel [J, 1, up]: tap j of output phase r is h[j·up + half − r·down], first input offset j_min)."""
    h = _filter(up, down, zeros)
    half = (len(h) - 1) // 2
    lo = min(-((half - r * down) // up) for r in range(up))  # ceil((r·down − half) / up)
    hi = max((r * down + half) // up for r in range(up))
    kernel = np.zeros((hi - lo + 1, 1, up), np.float32)
    for r in range(up):
        for j in range(lo, hi + 1):
            i = j * up + half - r * down
            if 0 <= i < len(h):
                kernel[j - lo, 0, r] = h[i]
    return kernel, lo


def resample(audio: jax.Array, from_rate: int, to_rate: int, zeros: int = 16) -> jax.Array:
    """[..., N] at `from_rate` → [..., ceil(N · to / from)] at `to_rate` (unchanged when the rates agree)."""
    if from_rate == to_rate:
        return audio
    g = math.gcd(from_rate, to_rate)
    up, down = to_rate // g, from_rate // g
    kernel, lo = _phases(up, down, zeros)
    n = audio.shape[-1]
    out = -(-n * up // down)
    blocks = -(-out // up)
    right = max(0, (blocks - 1) * down + lo + len(kernel) - n)
    x = audio.reshape(-1, n, 1)
    y = jax.lax.conv_general_dilated(x, jnp.asarray(kernel, x.dtype), (down,), [(-lo, right)],
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y[:, :blocks].reshape(*audio.shape[:-1], blocks * up)[..., :out]