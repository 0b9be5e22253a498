"""Mel filterbanks (numpy, built once) and mel / log-mel spectrograms (JAX).

The filterbank reproduces `librosa.filters.mel` (Slaney mel scale and area normalisation by
default; `htk=True, norm=None` gives torchaudio's defaults) so features computed here match
features computed by librosa at data time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from melody_jax.audio.stft import magnitude, stft

_SLANEY_HZ_PER_MEL = 200.0 / 3.0
_SLANEY_LOG_START_HZ = 1000.0
_SLANEY_LOG_STEP = np.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray, htk: bool = False) -> np.ndarray:
    """Hz → mel: HTK's `2595 log10(1 + f/700)`, or Slaney's (linear below 1 kHz, log above)."""
    hz = np.asarray(hz, dtype=np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
    linear = hz / _SLANEY_HZ_PER_MEL
    log_ratio = np.log(np.maximum(hz, _SLANEY_LOG_START_HZ) / _SLANEY_LOG_START_HZ)
    logarithmic = log_start_mel + log_ratio / _SLANEY_LOG_STEP
    return np.where(hz >= _SLANEY_LOG_START_HZ, logarithmic, linear)


def mel_to_hz(mel: np.ndarray, htk: bool = False) -> np.ndarray:
    """Inverse of `hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    log_start_mel = _SLANEY_LOG_START_HZ / _SLANEY_HZ_PER_MEL
    linear = mel * _SLANEY_HZ_PER_MEL
    logarithmic = _SLANEY_LOG_START_HZ * np.exp(_SLANEY_LOG_STEP * (mel - log_start_mel))
    return np.where(mel >= log_start_mel, logarithmic, linear)


@functools.lru_cache(maxsize=None)
def mel_filterbank(
    sample_rate: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
    norm: str | None = "slaney",
) -> np.ndarray:
    """Triangular mel filters `float32 [n_fft // 2 + 1, n_mels]` (librosa's, transposed). Read-only.

    `norm='slaney'` divides each triangle by its bandwidth (constant energy per band); `None`
    leaves peaks at 1.
    """
    if norm not in ("slaney", None):
        raise ValueError(f"norm must be 'slaney' or None, got {norm!r}")
    fmax = sample_rate / 2.0 if fmax is None else fmax
    edges = mel_to_hz(np.linspace(hz_to_mel(fmin, htk), hz_to_mel(fmax, htk), n_mels + 2), htk)
    return _triangles(sample_rate, n_fft, edges, norm == "slaney")


def _triangles(sample_rate: int, n_fft: int, edges: np.ndarray, area_norm: bool) -> np.ndarray:
    """float32 [n_fft // 2 + 1, len(edges) − 2], read-only: filter k rises from edges[k] to 1 at edges[k + 1]
    and falls to edges[k + 2]; `area_norm` divides it by its bandwidth."""
    fft_freqs = np.fft.rfftfreq(n_fft, d=1.0 / sample_rate)
    widths = np.diff(edges)
    ramps = edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(rising, falling))
    if area_norm:
        weights *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    out = np.ascontiguousarray(weights.T, dtype=np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def semitone_filterbank(sample_rate: int, n_fft: int, n_bins: int, fmin: float) -> np.ndarray:
    """Triangular filters `float32 [n_fft // 2 + 1, n_bins]` centred a semitone apart from `fmin` (librosa's
    constant-Q meaning: the lowest centre), each reaching its neighbours' centres, area-normalised: a
    log-frequency spectrogram, where a pitch class is every 12th band (the input of key classifiers such as
    Korzeniowski & Widmer 2017, where a mel scale merges neighbouring semitones below ~1 kHz). Read-only."""
    top = fmin * 2 ** (n_bins / 12)
    resolved = fmin * (2 ** (1 / 12) - 2 ** (-1 / 12)) > 2 * sample_rate / n_fft  # ≥ 2 bins in the lowest band
    if not resolved or top > sample_rate / 2:
        raise ValueError(f"{n_bins} semitone bands from fmin={fmin:g} Hz need n_fft={n_fft}'s bins narrower than half "
                         f"the lowest band and a top edge ({top:.0f} Hz) below Nyquist ({sample_rate / 2:g} Hz)")
    return _triangles(sample_rate, n_fft, fmin * 2 ** ((np.arange(n_bins + 2) - 1) / 12), True)


def mel_spectrogram(
    x: jax.Array,
    sample_rate: int,
    n_fft: int,
    hop_length: int,
    n_mels: int,
    win_length: int | None = None,
    fmin: float = 0.0,
    fmax: float | None = None,
    power: float = 2.0,
    htk: bool = False,
    norm: str | None = "slaney",
    center: bool = True,
    pad_mode: str = "reflect",
) -> jax.Array:
    """`[..., T] -> [..., frames, n_mels]`, `librosa.feature.melspectrogram` transposed to time-major."""
    spec = magnitude(stft(x, n_fft, hop_length, win_length, center=center, pad_mode=pad_mode))
    if power != 1.0:
        spec = spec**power
    return spec @ mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax, htk, norm)


def log_mel_spectrogram(x: jax.Array, *args, floor: float = 1e-5, **kwargs) -> jax.Array:
    """`log(max(mel, floor))` (natural log, HiFi-GAN's clamp); arguments as `mel_spectrogram`."""
    return jnp.log(jnp.maximum(mel_spectrogram(x, *args, **kwargs), floor))
