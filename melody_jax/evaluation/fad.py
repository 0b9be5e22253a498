"""Fréchet audio distance: the Fréchet distance between Gaussians fitted to two sets of embeddings.

FAD = |μa − μb|² + tr(Σa + Σb − 2 (Σa Σb)^½) (Kilgour et al. 2019). It is biased upward for few
samples, so compare FADs only at equal sample counts; `embedding_stats` reports the count.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class EmbeddingStats(NamedTuple):
    mean: np.ndarray  # [D]
    cov: np.ndarray  # [D, D]
    count: int


def embedding_stats(embeddings: np.ndarray) -> EmbeddingStats:
    """Mean and (unbiased) covariance of embeddings [N, D], N ≥ 2."""
    x = np.asarray(embeddings, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"FAD needs at least two embeddings as [N, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("FAD got non-finite embeddings")
    return EmbeddingStats(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), x.shape[0])


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(a: EmbeddingStats, b: EmbeddingStats) -> float:
    """Fréchet distance of two Gaussians. tr((Σa Σb)^½) is taken as Σ √λ of the symmetric
    Σa^½ Σb Σa^½ (same eigenvalues as Σa Σb), which stays real and stable when N < D."""
    diff = a.mean - b.mean
    root = _psd_sqrt(a.cov)
    eig = np.linalg.eigvalsh(root @ b.cov @ root)
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * np.sqrt(np.clip(eig, 0.0, None)).sum()
    return float(max(value, 0.0))


def frechet_audio_distance(embeddings_a: np.ndarray, embeddings_b: np.ndarray) -> float:
    return frechet_distance(embedding_stats(embeddings_a), embedding_stats(embeddings_b))
