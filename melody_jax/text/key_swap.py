"""Key-swapped captions: the hard negatives that make a contrastive text–audio model hear the key.

A contrastive batch of captions differing in instruments, tempo and mood is told apart without the key, so
MuLan's towers never learn it (their embeddings probe the key at chance). Replacing a caption's key ("in F#
minor" → "in D major") gives a negative that only the key separates from the positive, as NegCLIP's swapped-word
negatives (Yuksekgonul et al. 2023) do for word order.
"""
from __future__ import annotations

import re

import numpy as np

TONICS = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_SPELLINGS = {**{t: i for i, t in enumerate(TONICS)}, "Db": 1, "D#": 3, "Gb": 6, "G#": 8, "A#": 10, "Cb": 11,
              "B#": 0, "E#": 5, "Fb": 4}
KEY = re.compile(r"\b([A-G][#b]?) ((?i:major|minor))\b(?!-)")  # not "a minor-key tune"


def swap_key(text: str, rng: np.random.Generator) -> str | None:
    """`text` with the first key it names ("A minor", "F# major") replaced by one of the 23 others (tonic and mode
    drawn together), or None where it names none."""
    match = KEY.search(text)
    if match is None:
        return None
    own = _SPELLINGS[match.group(1)] + 12 * (match.group(2).lower() == "minor")
    other = int(rng.integers(23))
    other += other >= own
    key = f"{TONICS[other % 12]} {'minor' if other >= 12 else 'major'}"
    return text[:match.start()] + key + text[match.end():]
