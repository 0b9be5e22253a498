"""Spectral reconstruction losses for the VAE-GAN (§4.1) and the MusicGen codec (§6).

All take `[..., T]` waveforms, return a scalar (mean over batch and bins), and are jittable; the
resolution lists are static Python values so each resolution compiles to its own STFT.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from melody_jax.audio.mel import log_mel_spectrogram, mel_spectrogram
from melody_jax.audio.stft import hann_window, magnitude, stft


class STFTResolution(NamedTuple):
    n_fft: int
    hop_length: int
    win_length: int


def resolutions(
    n_ffts: Sequence[int], hop_lengths: Sequence[int], win_lengths: Sequence[int]
) -> tuple[STFTResolution, ...]:
    """Zips config lists (JSON-friendly) into resolutions, with a one-line error on bad values."""
    if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
        raise ValueError(
            f"STFT resolution lists differ in length: n_fft {len(n_ffts)}, hop {len(hop_lengths)}, "
            f"win {len(win_lengths)}"
        )
    out = tuple(STFTResolution(int(n), int(h), int(w)) for n, h, w in zip(n_ffts, hop_lengths, win_lengths))
    for r in out:
        if not (0 < r.win_length <= r.n_fft and r.hop_length > 0):
            raise ValueError(f"bad STFT resolution {r}: need 0 < win_length <= n_fft and hop_length > 0")
    return out


# §4.1 [paper]: the VAE-GAN's 7 resolutions.
PAPER_MR_STFT = resolutions(
    n_ffts=[8192, 4096, 2048, 512, 128, 64, 32],
    hop_lengths=[2048, 1024, 512, 128, 32, 16, 8],
    win_lengths=[4096, 2048, 1024, 256, 64, 32, 16],
)


def mr_stft_l1(
    x: jax.Array, y: jax.Array, stft_resolutions: Sequence[STFTResolution] = PAPER_MR_STFT
) -> jax.Array:
    """Multi-resolution STFT distance: mean over resolutions of mean |‖STFT x‖ − ‖STFT y‖|."""
    losses = [
        jnp.mean(jnp.abs(magnitude(stft(x, *r)) - magnitude(stft(y, *r))))
        for r in stft_resolutions
    ]
    return jnp.mean(jnp.stack(losses))


def log_mel_l1(x: jax.Array, y: jax.Array, *mel_args, **mel_kwargs) -> jax.Array:
    """L1 between log-mel spectrograms; arguments as `mel.log_mel_spectrogram` (HiFi-GAN's mel loss)."""
    log_x = log_mel_spectrogram(x, *mel_args, **mel_kwargs)
    log_y = log_mel_spectrogram(y, *mel_args, **mel_kwargs)
    return jnp.mean(jnp.abs(log_x - log_y))


def _audiocraft_mel(
    x: jax.Array, sample_rate: int, n_fft: int, n_mels: int, fmin: float, normalized: bool
) -> jax.Array:
    """audiocraft's `MelSpectrogramWrapper` (log off): reflect-pad `(n_fft - hop) // 2`, zero-pad the
    end to whole frames, no centring, power-2 mel with torchaudio's filters (HTK, no area norm)."""
    hop = n_fft // 4
    pad = (n_fft - hop) // 2
    x = jnp.asarray(x, jnp.float32)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)], mode="reflect")
    frames = 1 + max(0, -(-(x.shape[-1] - n_fft) // hop))
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, (frames - 1) * hop + n_fft - x.shape[-1])])
    mel = mel_spectrogram(x, sample_rate, n_fft, hop, n_mels, fmin=fmin, htk=True, norm=None, center=False)
    if normalized:  # torchaudio's normalized=True: the STFT is divided by the window's L2 norm
        mel = mel / float(np.sum(hann_window(n_fft).astype(np.float64) ** 2))
    return mel


def multi_scale_mel_loss(
    x: jax.Array,
    y: jax.Array,
    sample_rate: int,
    scales: Sequence[int] = (6, 7, 8, 9, 10),
    n_mels: int = 64,
    fmin: float = 64.0,
    floor: float = 1e-5,
    alphas: bool = False,
    normalized: bool = True,
) -> jax.Array:
    """audiocraft's `MultiScaleMelSpectrogramLoss` ("msspec"), the MusicGen codec's mel loss.

    For each `i` in `scales`: n_fft = win = 2**i, hop = 2**i / 4; the term is
    `L1(mel_x, mel_y) + alpha_i * MSE(log10(floor + mel_x), log10(floor + mel_y))` with
    `alpha_i = sqrt(2**i - 1)` if `alphas` else 1. `normalized` divides each spectrum by the window
    energy and the summed loss by `sum(alpha_i + 1)`. Defaults are audiocraft's compression solver
    config (`range_start=6, range_end=11, n_mels=64, f_min=64, normalized=true, alphas=false`).
    """
    total, weight = 0.0, 0.0
    for i in scales:
        n_fft = 2**i
        mel_x, mel_y = (_audiocraft_mel(s, sample_rate, n_fft, n_mels, fmin, normalized) for s in (x, y))
        alpha = float(np.sqrt(n_fft - 1)) if alphas else 1.0
        log_gap = jnp.log10(floor + mel_x) - jnp.log10(floor + mel_y)
        total = total + jnp.mean(jnp.abs(mel_x - mel_y)) + alpha * jnp.mean(log_gap**2)
        weight += alpha + 1.0
    return total / weight if normalized else total
