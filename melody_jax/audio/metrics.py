"""Reconstruction metrics for the audio autoencoders (VAE-GAN §4.1, codec §6), jittable, per batch.

- `mr_stft_distance`: mean L1 of STFT magnitudes over resolutions (the VAE-GAN's training loss
  without its weight; lower is better).
- `log_mel_distance`: L1 of natural-log mel spectrograms (HiFi-GAN's mel error; lower is better).
- `si_snr`: scale-invariant signal-to-noise ratio in dB per example (higher is better).
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from melody_jax.audio.losses import PAPER_MR_STFT, STFTResolution, log_mel_l1, mr_stft_l1


def mr_stft_distance(estimate: jax.Array, reference: jax.Array,
                     resolutions: Sequence[STFTResolution] = PAPER_MR_STFT) -> jax.Array:
    return mr_stft_l1(estimate, reference, resolutions)


def log_mel_distance(estimate: jax.Array, reference: jax.Array, sample_rate: int, n_fft: int = 1024,
                     hop_length: int = 256, n_mels: int = 80) -> jax.Array:
    return log_mel_l1(estimate, reference, sample_rate, n_fft, hop_length, n_mels)


def si_snr(estimate: jax.Array, reference: jax.Array, eps: float = 1e-8) -> jax.Array:
    """dB per example of `[B, ...]` over all its samples (or frames and channels of latents): zero-mean
    signals, the reference rescaled to best fit."""
    est = estimate.reshape(estimate.shape[0], -1)
    ref = reference.reshape(reference.shape[0], -1)
    est, ref = est - est.mean(-1, keepdims=True), ref - ref.mean(-1, keepdims=True)
    target = (est * ref).sum(-1, keepdims=True) / ((ref * ref).sum(-1, keepdims=True) + eps) * ref
    noise = est - target
    return 10.0 * jnp.log10(((target**2).sum(-1) + eps) / ((noise**2).sum(-1) + eps))


def reconstruction_metrics(estimate: jax.Array, reference: jax.Array, sample_rate: int,
                           resolutions: Sequence[STFTResolution] = PAPER_MR_STFT) -> dict[str, jax.Array]:
    """All three, batch-averaged: what `launch.reconstruct` prints and the stages log in evaluation."""
    return {"mr_stft": mr_stft_distance(estimate, reference, resolutions),
            "log_mel_l1": log_mel_distance(estimate, reference, sample_rate),
            "si_snr_db": jnp.mean(si_snr(estimate, reference))}
