"""Chromagrams for MusicGen melody conditioning (§6), computed with librosa at data time (numpy).

Follows audiocraft's `ChromaExtractor`: power-2 STFT (n_fft 2**12 by default; MusicGen-melody's
`chroma_stem` uses 2**14 with hop 4096 at 32 kHz), chroma filters at tuning 0, max-normalised per
frame, then reduced to a one-hot argmax per frame. audiocraft first isolates the melodic stems (vocals
+ other) with Demucs; no separation model is available offline, so separation "hpss" keeps librosa's
harmonic part instead (drums removed, bass kept), and "none" takes the full mix.
"""
from __future__ import annotations

from typing import TypeVar

import jax
import librosa
import numpy as np

NUM_CHROMA = 12

Array = TypeVar("Array", np.ndarray, jax.Array)


def chromagram(audio: np.ndarray, sample_rate: int, n_fft: int = 4096, hop_length: int | None = None) -> np.ndarray:
    """`[..., T]` waveform → `float32 [..., frames, 12]` chroma, bin 0 = C, each frame max-normalised."""
    hop_length = n_fft // 4 if hop_length is None else hop_length
    chroma = librosa.feature.chroma_stft(
        y=np.asarray(audio, np.float32), sr=sample_rate, n_fft=n_fft, hop_length=hop_length,
        tuning=0.0, n_chroma=NUM_CHROMA, norm=np.inf,
    )
    return np.swapaxes(chroma, -1, -2).astype(np.float32)


SEPARATIONS = ("none", "hpss")


def melody_rows(audio: np.ndarray, sample_rate: int, hop: int, rows: int, n_fft: int = 4096,
                separation: str = "none") -> np.ndarray:
    """`[..., T]` waveform → `float32 [..., rows, 12]`: the chromagram at one row per `hop` samples,
    cut or edge-extended to `rows` (MusicGen's melody prefix; the model takes the argmax, and a silent
    row, all zeros, is its null melody)."""
    if separation not in SEPARATIONS:
        raise ValueError(f"separation must be one of {SEPARATIONS}, got {separation!r}")
    audio = np.asarray(audio, np.float32)
    if separation == "hpss":
        audio = librosa.effects.harmonic(audio)
    chroma = chromagram(audio, sample_rate, n_fft=n_fft, hop_length=hop)
    return chroma[..., np.minimum(np.arange(rows), chroma.shape[-2] - 1), :]


def chroma_onehot(chroma: Array) -> Array:
    """`[..., 12]` chroma → one-hot of its argmax (float32), numpy or JAX arrays alike.

    A silent frame (all zeros) maps to bin 0, as in audiocraft.
    """
    return (chroma.argmax(axis=-1)[..., None] == np.arange(NUM_CHROMA)).astype(np.float32)
