"""Short-time Fourier transform in pure JAX, matching `librosa.stft` frame for frame.

Audio is `[..., T]` (usually `[batch, T]`); spectra are `[..., frames, n_fft // 2 + 1]` (time
before frequency, like the rest of the project's NWC tensors). Everything is jittable: the window
is a numpy constant and framing uses static slices of a reshaped signal instead of a gather.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=None)
def hann_window(win_length: int) -> np.ndarray:
    """Periodic Hann window (`scipy.signal.get_window('hann', N, fftbins=True)`), float32, read-only."""
    if win_length <= 0:
        raise ValueError(f"win_length must be positive, got {win_length}")
    n = np.arange(win_length, dtype=np.float64)
    window = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / win_length)).astype(np.float32)
    window.setflags(write=False)
    return window


def num_frames(num_samples: int, n_fft: int, hop_length: int, center: bool = True) -> int:
    """Frames `stft` returns for a signal of `num_samples` (librosa's count)."""
    padded = num_samples + 2 * (n_fft // 2) if center else num_samples
    if padded < n_fft:
        raise ValueError(f"signal of {num_samples} samples is shorter than n_fft={n_fft}")
    return 1 + (padded - n_fft) // hop_length


def frame(x: jax.Array, frame_length: int, hop_length: int, frames: int) -> jax.Array:
    """`[..., T] -> [..., frames, frame_length]`, frame `i` = `x[..., i*hop : i*hop + frame_length]`.

    Built from `ceil(frame_length / hop)` shifted slices of `x` reshaped to `[..., chunks, hop]`,
    which lowers to cheap slices and a concat rather than a gather.
    """
    shifts = -(-frame_length // hop_length)
    chunks = frames - 1 + shifts
    needed = chunks * hop_length
    length = x.shape[-1]
    if length < needed:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, needed - length)])
    x = x[..., :needed].reshape(*x.shape[:-1], chunks, hop_length)
    parts = [x[..., j : j + frames, :] for j in range(shifts)]
    return jnp.concatenate(parts, axis=-1)[..., :frame_length]


def stft(
    x: jax.Array,
    n_fft: int,
    hop_length: int,
    win_length: int | None = None,
    center: bool = True,
    pad_mode: str = "reflect",
) -> jax.Array:
    """Complex STFT `[..., T] -> complex64 [..., frames, n_fft // 2 + 1]`.

    Equals `librosa.stft(x, n_fft=n_fft, hop_length=hop_length, win_length=win_length,
    window='hann', center=center, pad_mode=pad_mode)` transposed to time-major. Only the
    `win_length` non-zero samples of each frame are cut out; they are windowed and zero-padded
    centred to `n_fft` before the rfft, so short windows cost no extra framing memory.
    """
    win_length = n_fft if win_length is None else win_length
    if not 0 < win_length <= n_fft:
        raise ValueError(f"need 0 < win_length <= n_fft, got win_length={win_length}, n_fft={n_fft}")
    x = jnp.asarray(x, jnp.float32)
    if center:
        pad = n_fft // 2
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode=pad_mode)
    frames_count = num_frames(x.shape[-1], n_fft, hop_length, center=False)
    left = (n_fft - win_length) // 2
    frames = frame(x[..., left:], win_length, hop_length, frames_count)
    window = hann_window(win_length)
    frames = frames * window
    frames = jnp.pad(frames, [(0, 0)] * (frames.ndim - 1) + [(left, n_fft - win_length - left)])
    return jnp.fft.rfft(frames, n=n_fft, axis=-1)


def magnitude(spec: jax.Array, eps: float = 1e-12) -> jax.Array:
    """|spec| with a floor under the square root, so gradients stay finite at silent bins."""
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    return jnp.sqrt(jnp.maximum(power, eps))


def spectral_flux(log_bands: jax.Array) -> jax.Array:
    """[..., frames, bands] log power → its half-wave rectified rise from the previous frame (0 at the first)."""
    return jnp.maximum(jnp.diff(log_bands, axis=-2, prepend=log_bands[..., :1, :]), 0.0)
