"""Does generated audio carry what its synthetic prompt asked for? Tempo, key and mode, drums, lead
instrument — recovered from the audio by instruments this project did not train.

Tempo, key and drums use the classical estimators of `data_pipeline.recover` (the same ones that
check the synthetic dataset itself). The lead instrument is read by a nearest-centroid classifier on
musicnn embeddings, fitted on reference clips whose lead is known; its leave-one-out accuracy on the
reference is reported as the ceiling that generated audio is compared with.

Every prompt is checked on every attribute, named or not; `named` says which a prompt's text states (its key, its
BPM, whether drums play), so the share over just those prompts can be read beside the whole one: a prompt silent on an
attribute the synthetic data draws apart from its words can only be guessed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipeline import recover
from data_pipeline.captions import says_drums

TEMPO_TOLERANCE = 0.05  # relative; the synthetic data's own check (tests/test_data_synthetic.py)
CHECKS = ("tempo", "key", "drums", "instrument")


def tempo_hit(audio: np.ndarray, sample_rate: int, bpm: float) -> bool:
    """Whether the tempo recovered from `audio` lies within TEMPO_TOLERANCE of `bpm`."""
    return tempo_matches(recover.estimate_tempo(audio, sample_rate), bpm)


def tempo_matches(estimated: float, bpm: float) -> bool:
    """Whether a tempo `estimated` (in BPM, from audio or from tokens) lies within TEMPO_TOLERANCE of `bpm`."""
    return abs(estimated / float(bpm) - 1.0) <= TEMPO_TOLERANCE


def named(text: str, asked: Mapping[str, Any]) -> dict[str, bool]:
    """Whether a prompt names its key ("… in F# minor …"; many synthetic captions say only "minor-key" or nothing),
    its tempo in BPM ("… 124 BPM", "around 164 beats per minute"; others say "fast" or nothing) and whether drums
    play (`data_pipeline.captions.says_drums`: one synthetic template in eight names only the lead)."""
    return {"key": "key" in asked and f"{asked['key']} {asked['mode']}" in text,
            "tempo": re.search(rf"\b{int(asked['tempo_bpm'])}\b", text) is not None,
            "drums": says_drums(text)}


def recovered_hits(audio: np.ndarray, sample_rate: int, asked: Mapping[str, Any]) -> dict[str, bool]:
    """Which of tempo (within TEMPO_TOLERANCE), key + mode (exact) and drums (yes/no) match `asked`."""
    tonic, mode = recover.estimate_key(audio, sample_rate)
    return {"tempo": tempo_hit(audio, sample_rate, asked["tempo_bpm"]),
            "key": (tonic, mode) == (int(asked["tonic"]) % 12, asked["mode"]),
            "drums": recover.has_drums(audio) == bool(asked["drums"])}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest_centroid(train: np.ndarray, labels: Sequence[str], queries: np.ndarray) -> list[str]:
    """Cosine nearest-centroid labels of queries [N, D] given labelled rows train [M, D]."""
    classes = sorted(set(labels))
    lab = np.asarray(labels)
    centroids = _unit(np.stack([_unit(train)[lab == c].mean(0) for c in classes]))
    return [classes[i] for i in np.argmax(_unit(queries) @ centroids.T, axis=1)]


def leave_one_out_predictions(x: np.ndarray, labels: Sequence[str], queries: np.ndarray | None = None) -> list[str]:
    """Row i's nearest-centroid label from centroids of x [N, D] fitted without row i: of x itself, or of
    queries [N, D] made from x's rows (a clip's resynthesis is read without the clip it came from)."""
    queries = x if queries is None else queries
    return [nearest_centroid(np.delete(x, i, 0), [l for j, l in enumerate(labels) if j != i], queries[i: i + 1])[0]
            for i in range(len(labels))]


def hits(audio: Sequence[np.ndarray], sample_rate: int, asked: Sequence[Mapping[str, Any]],
         instruments: Sequence[str]) -> list[dict[str, bool]]:
    """Per clip, whether its recovered tempo, key, drums and (given) instrument match what was asked."""
    return [{**recovered_hits(a, sample_rate, want), "instrument": got == want["lead"]}
            for a, want, got in zip(audio, asked, instruments)]


def shares(rows: Sequence[Mapping[str, bool]]) -> dict[str, float]:
    """The share of `hits` rows right on each check."""
    return {check: float(np.mean([r[check] for r in rows])) for check in CHECKS}


def accuracy(audio: Sequence[np.ndarray], sample_rate: int, asked: Sequence[Mapping[str, Any]],
             instruments: Sequence[str]) -> dict[str, float]:
    """Share of clips whose recovered tempo, key, drums and (given) instrument match what was asked."""
    return shares(hits(audio, sample_rate, asked, instruments))


def named_accuracy(rows: Sequence[Mapping[str, bool]], texts: Sequence[str],
                   asked: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """For the key, the tempo and the drums, the share of `hits` rows right over the prompts that name it (None if
    none do)."""
    names = [named(t, a) for t, a in zip(texts, asked)]
    out = {}
    for check in ("key", "tempo", "drums"):
        picked = [r[check] for r, n in zip(rows, names) if n[check]]
        out[check] = {"accuracy": float(np.mean(picked)) if picked else None, "prompts": len(picked)}
    return out
