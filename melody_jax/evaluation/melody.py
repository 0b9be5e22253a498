"""Does generated audio follow the melody it was given? Its chromagram against the given one.

Both chromagrams come from `melody_rows`, the function that makes MusicGen's melody condition, so the
comparison is made at the rows the model saw. Two statistics per clip, averaged over clips:
- `agreement`: the share of rows whose strongest pitch class is the given one (chance 1/12 when the
  generated pitch classes are unrelated to the given ones);
- `correlation`: Pearson's r between the generated chromagram and the one-hot of the given one,
  over all rows × 12 bins (0 when unrelated; 1 when the generated chroma is that one-hot).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from melody_jax.audio.chroma import chroma_onehot, melody_rows


def chroma_adherence(generated: np.ndarray, given: np.ndarray | Sequence[np.ndarray], sample_rate: int, hop: int,
                     rows: int) -> dict[str, float]:
    """Generated audio `[B, T]` against the given melodies (audio, one per row) → mean agreement and r."""
    ours = melody_rows(np.asarray(generated, np.float32), sample_rate, hop, rows)
    theirs = chroma_onehot(np.stack([melody_rows(np.asarray(m, np.float32), sample_rate, hop, rows) for m in given]))
    agreement = (ours.argmax(-1) == theirs.argmax(-1)).mean(-1)
    correlation = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)]
    return {"agreement": float(agreement.mean()), "correlation": float(np.nan_to_num(correlation).mean())}
