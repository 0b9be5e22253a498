"""Do semantic tokens carry a clip's attributes? A linear-ish probe on bags of tokens (issue 5, issue 23).

Each clip becomes the Hellinger features of its token histogram (square roots of the normalised
counts), and a nearest-centroid classifier is scored by stratified k-fold cross-validation: a token
stream that carries the key, lead, drums or tempo band lets clips of one class share a histogram
shape, so the probe beats the majority class.

A histogram has no time, so the beat gets its own probe (`beat_r2`): how much of the clip's onset strength
at each token frame a ridge regression reads from the tokens around that frame. Tempo lives in where the
onsets fall; tokens that do not mark them leave the semantic LM and the DPD nothing to keep a tempo with.
The same regression, fitted on clips, reads an envelope from any token stream (`envelope_reader`), so the
tempo of streams no audio was rendered for (the semantic LM's) is measured by the audio's beat tracker.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import librosa
import numpy as np
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, StratifiedKFold, cross_val_score
from sklearn.neighbors import NearestCentroid

from data_pipeline.recover import envelope_tempo

FOLDS = 4
BEAT_CONTEXT = 3  # tokens each side of a frame (± 0.12 s at 25 Hz): an onset marked a token early or late counts


def histograms(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Hellinger features [clips, vocab_size] of int tokens [clips, T]: square roots of each row's normalised
    token histogram."""
    hist = np.stack([np.bincount(t, minlength=vocab_size) for t in np.asarray(tokens)]).astype(np.float64)
    return np.sqrt(hist / hist.sum(1, keepdims=True))


def _accuracy(features: np.ndarray, labels: Sequence[Any], folds: int) -> float:
    """Nearest-centroid on rows of features, `folds`-fold stratified cross-validation (fixed shuffle)."""
    split = StratifiedKFold(folds, shuffle=True, random_state=0)
    return float(cross_val_score(NearestCentroid(), features, np.asarray(labels), cv=split).mean())


def probe_accuracy(tokens: np.ndarray, labels: Sequence[Any], vocab_size: int, folds: int = FOLDS) -> float:
    """Nearest-centroid on token histograms, `folds`-fold stratified cross-validation (fixed shuffle)."""
    return _accuracy(histograms(tokens, vocab_size), labels, folds)


def feature_probe(features: np.ndarray, labels: Sequence[Any], folds: int = FOLDS) -> dict[str, Any] | None:
    """The nearest-centroid probe over the rows whose class has at least `folds` members (every fold then sees
    each class), beside the majority share of those rows; None where fewer than two classes remain."""
    labels = np.asarray([str(x) for x in labels])
    names, counts = np.unique(labels, return_counts=True)
    kept = np.isin(labels, names[counts >= folds])
    if len(names[counts >= folds]) < 2:
        return None
    return {"accuracy": _accuracy(np.asarray(features)[kept], labels[kept], folds),
            "majority": float(counts[counts >= folds].max() / kept.sum()), "clips": int(kept.sum()),
            "classes": int((counts >= folds).sum())}


def probe(tokens: np.ndarray, labels: Sequence[Any], vocab_size: int, folds: int = FOLDS) -> dict[str, Any] | None:
    """`feature_probe` on the clips' token histograms."""
    return feature_probe(histograms(tokens, vocab_size), labels, folds)


def onset_envelopes(audio: np.ndarray, sample_rate: int, hop: int, frames: int) -> np.ndarray:
    """float [clips, frames]: librosa's onset strength of each clip [clips, samples] at one frame per `hop`
    samples (the token rate; the envelope `data_pipeline.recover.estimate_tempo` tracks beats in)."""
    return np.stack([librosa.onset.onset_strength(y=np.asarray(a, np.float32), sr=sample_rate,
                                                  hop_length=hop)[:frames] for a in audio])


def _windows(tokens: np.ndarray, vocab_size: int, context: int) -> np.ndarray:
    """float [clips, frames − 2·context, (2·context + 1)·vocab_size]: the one-hot tokens t − context … t + context
    of each frame t whose whole neighbourhood lies inside its clip."""
    tokens = np.asarray(tokens)
    inner = tokens.shape[1] - 2 * context
    if inner < 1:
        raise ValueError(f"need clips longer than {2 * context} tokens, got {tokens.shape[1]}")
    onehot = np.eye(vocab_size)[tokens]
    return np.concatenate([onehot[:, i:i + inner] for i in range(2 * context + 1)], -1)


def _frames(tokens: np.ndarray, envelopes: np.ndarray, vocab_size: int,
            context: int) -> tuple[np.ndarray, np.ndarray]:
    """The beat regression's data, clip-major: (`_windows` rows [clips · inner frames, features], the
    envelopes at those frames)."""
    x = _windows(tokens, vocab_size, context)
    y = np.asarray(envelopes, np.float64)[:, context:context + x.shape[1]]
    return x.reshape(-1, x.shape[-1]), y.reshape(-1)


def beat_r2(tokens: np.ndarray, envelopes: np.ndarray, vocab_size: int, folds: int = FOLDS,
            context: int = BEAT_CONTEXT) -> float:
    """Cross-validated R² of a ridge regression from the one-hot tokens t − context … t + context to
    envelopes[:, t], over the frames t with that whole neighbourhood inside the clip (edges would tell where a
    clip starts, not where its onsets are); folds split clips, not frames. 1: the tokens mark every onset;
    ≤ 0: they tell nothing of where onsets fall."""
    x, y = _frames(tokens, envelopes, vocab_size, context)
    groups = np.repeat(np.arange(len(tokens)), len(y) // len(tokens))
    return float(cross_val_score(Ridge(alpha=1.0), x, y, groups=groups, cv=GroupKFold(folds), scoring="r2").mean())


def envelope_reader(tokens: np.ndarray, envelopes: np.ndarray, vocab_size: int,
                    context: int = BEAT_CONTEXT) -> Callable[[np.ndarray], np.ndarray]:
    """The ridge regression of `beat_r2`, fitted on all these clips: a function from any token streams
    int [N, T > 2·context] to their onset envelopes [N, T − 2·context] (non-negative, as onset strength is).
    It reads where a stream's tokens put onsets, so the tempo of token streams no audio was rendered for (the
    semantic LM's) can be measured with the same beat tracker as audio (`token_tempi`)."""
    ridge = Ridge(alpha=1.0).fit(*_frames(tokens, envelopes, vocab_size, context))

    def read(streams: np.ndarray) -> np.ndarray:
        w = _windows(streams, vocab_size, context)
        return np.maximum(ridge.predict(w.reshape(-1, w.shape[-1])).reshape(w.shape[:2]), 0.0)
    return read


def token_tempi(read: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, sample_rate: int,
                hop: int) -> list[float]:
    """The tempo in BPM of each token stream [N, T] (`hop` samples a token), from the onset envelope `read`
    gives it (`envelope_reader`); 0.0 where the beat tracker finds fewer than three beats."""
    return [envelope_tempo(e, sample_rate, hop) for e in read(tokens)]
