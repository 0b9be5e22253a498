"""Acoustic frame features at a model's frame rate, in JAX: the discrete-target sources of HuBERT-style
pre-training (HuBERT's first iteration clusters MFCCs; MERT adds a constant-Q view of pitch for music).

Frame t of a `hop`-sample frame rate is the STFT frame centred on sample t·hop (window 2·hop), so a clip
of N samples gives N // hop frames, the count the SSL model's conv encoder gives. "chroma" folds the STFT
power onto the 12 pitch classes with librosa's chroma filters (the STFT form of a constant-Q chroma). "flux" is
each mel band's rise in log power since the previous frame (the half-wave rectified difference that librosa's
onset strength averages over bands): a drum hit is a broadband rise, a held note none. "onset_age" is the frames
since the clip's last onset (a peak of the band-mean flux above both the clip's mean + one deviation and
`ONSET_FLOOR`), capped at `MAX_ONSET_AGE`. It counts through each beat, so tokens that carry it differ at each
place between two onsets: a language model can keep a period by copying what followed the same place a beat
earlier instead of counting a run of identical tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np

from melody_jax.audio.chroma import NUM_CHROMA
from melody_jax.audio.mel import mel_filterbank
from melody_jax.audio.stft import magnitude, spectral_flux, stft

FEATURES = ("logmel", "mfcc", "chroma", "flux", "onset_age")
NUM_MELS, NUM_MFCC = 64, 20
MAX_ONSET_AGE = 24  # frames: 0.96 s at 25 Hz, a beat at 62.5 BPM
ONSET_FLOOR = 0.1  # band-mean flux (log power) an onset exceeds: a held tone's frame-to-frame ripple stays < 0.05


def onset_age(flux: jax.Array) -> jax.Array:
    """flux [B, T, bands] → float32 [B, T, 1]: frames since the last onset at or before each frame (capped)."""
    strength = flux.mean(-1)
    before = jnp.pad(strength, ((0, 0), (1, 0)), constant_values=jnp.inf)[:, :-1]
    after = jnp.pad(strength, ((0, 0), (0, 1)), constant_values=-jnp.inf)[:, 1:]
    floor = jnp.maximum(strength.mean(-1, keepdims=True) + strength.std(-1, keepdims=True), ONSET_FLOOR)
    onset = (strength > before) & (strength >= after) & (strength > floor)
    t = jnp.arange(strength.shape[-1])
    last = jax.lax.cummax(jnp.where(onset, t, -MAX_ONSET_AGE), axis=strength.ndim - 1)
    return jnp.minimum(t - last, MAX_ONSET_AGE).astype(jnp.float32)[..., None]


@functools.lru_cache(maxsize=None)
def chroma_filters(sample_rate: int, n_fft: int) -> np.ndarray:
    """float32 [n_fft // 2 + 1, 12] (librosa's chroma filterbank at tuning 0, transposed). Read-only."""
    out = np.ascontiguousarray(librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, n_chroma=NUM_CHROMA,
                                                      tuning=0.0).T, dtype=np.float32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=None)
def dct_matrix(n: int, k: int) -> np.ndarray:
    """float32 [n, k]: orthonormal DCT-II (scipy's `dct(norm="ortho")`), first k coefficients."""
    i = np.arange(n)[:, None] + 0.5
    out = np.cos(np.pi * i * np.arange(k)[None] / n) * np.sqrt(2.0 / n)
    out[:, 0] /= np.sqrt(2.0)
    return out.astype(np.float32)


def frame_features(audio: jax.Array, sample_rate: int, hop: int, names: tuple[str, ...]) -> jax.Array:
    """audio [B, N] → float32 [B, N // hop, D]: the named features (`FEATURES`) side by side."""
    n_fft = 2 * hop
    frames = audio.shape[-1] // hop
    power = jnp.square(magnitude(stft(audio, n_fft, hop)))[..., :frames, :]
    logmel = jnp.log(jnp.maximum(power @ mel_filterbank(sample_rate, n_fft, NUM_MELS), 1e-8))
    chroma = power @ chroma_filters(sample_rate, n_fft)
    flux = spectral_flux(logmel)
    parts = {"logmel": logmel, "mfcc": logmel @ dct_matrix(NUM_MELS, NUM_MFCC),
             "chroma": chroma / jnp.maximum(chroma.max(-1, keepdims=True), 1e-8),  # max-normalised, as librosa
             "flux": flux, "onset_age": onset_age(flux)}
    for name in names:
        if name not in parts:
            raise ValueError(f"frame feature {name!r} must be one of {FEATURES}")
    return jnp.concatenate([parts[name] for name in names], -1)
