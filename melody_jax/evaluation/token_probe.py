"""Do semantic tokens carry a clip's attributes? A linear-ish probe on bags of tokens (issue 5, issue 23).

Each clip becomes the Hellinger features of its token histogram (square roots of the normalised
counts), and a nearest-centroid classifier is scored by stratified k-fold cross-validation: a token
stream that carries the key, lead, drums or tempo band lets clips of one class share a histogram
shape, so the probe beats the majority class.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestCentroid

FOLDS = 4


def histograms(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Hellinger features [clips, vocab_size] of int tokens [clips, T]: square roots of each row's normalised
    token histogram."""
    hist = np.stack([np.bincount(t, minlength=vocab_size) for t in np.asarray(tokens)]).astype(np.float64)
    return np.sqrt(hist / hist.sum(1, keepdims=True))


def probe_accuracy(tokens: np.ndarray, labels: Sequence[Any], vocab_size: int, folds: int = FOLDS) -> float:
    """Nearest-centroid on token histograms, `folds`-fold stratified cross-validation (fixed shuffle)."""
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    scores = cross_val_score(NearestCentroid(), histograms(tokens, vocab_size), np.asarray(labels), cv=split)
    return float(scores.mean())


def probe(tokens: np.ndarray, labels: Sequence[Any], vocab_size: int, folds: int = FOLDS) -> dict[str, Any] | None:
    """`probe_accuracy` over the clips whose class has at least `folds` members (every fold then sees
    each class), beside the majority share of those clips; None where fewer than two classes remain."""
    labels = np.asarray([str(x) for x in labels])
    names, counts = np.unique(labels, return_counts=True)
    kept = np.isin(labels, names[counts >= folds])
    if len(names[counts >= folds]) < 2:
        return None
    return {"accuracy": probe_accuracy(np.asarray(tokens)[kept], labels[kept], vocab_size, folds),
            "majority": float(counts[counts >= folds].max() / kept.sum()), "clips": int(kept.sum()),
            "classes": int((counts >= folds).sum())}
