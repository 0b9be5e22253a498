"""Byte-level text tokenizer for MuLan's text tower (and any other text encoder of the project).

Text is tokenized as its UTF-8 bytes, so there is no trained vocabulary to ship or download, every
language and emoji is covered, and hostile text (control characters, lone surrogates, megabyte
strings) cannot crash it or map to an unknown token: any Python string becomes at most `max_length`
ids from a fixed vocabulary of 258.

Ids: 0 = padding, 1 = a leading [CLS] token (so even "" has one real token to pool), 2 + b = byte b.
Longer texts are truncated to their first `max_length - 1` bytes (possibly mid-character: harmless
for a byte model).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD_ID = 0
CLS_ID = 1
BYTE_OFFSET = 2
VOCAB_SIZE = 256 + BYTE_OFFSET


def to_utf8(text: str) -> bytes:
    """UTF-8 bytes of any str: surrogate pairs are joined, lone surrogates become U+FFFD."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def encode(text: str, max_length: int) -> np.ndarray:
    """int32 [n] with n ≤ max_length: [CLS] then the first max_length − 1 bytes of `text`."""
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    data = np.frombuffer(to_utf8(text)[: max_length - 1], dtype=np.uint8)
    return np.concatenate([[CLS_ID], data.astype(np.int32) + BYTE_OFFSET]).astype(np.int32)


def tokenize(texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [B, max_length], mask bool [B, max_length]); padding is PAD_ID with mask False."""
    tokens = np.full((len(texts), max_length), PAD_ID, np.int32)
    for row, text in enumerate(texts):
        ids = encode(text, max_length)
        tokens[row, : len(ids)] = ids
    return tokens, tokens != PAD_ID


def decode(tokens: np.ndarray) -> str:
    """Inverse of `encode` up to truncation (invalid UTF-8 from a cut character becomes U+FFFD)."""
    ids = np.asarray(tokens).reshape(-1)
    data = bytes((ids[ids >= BYTE_OFFSET] - BYTE_OFFSET).astype(np.uint8).tolist())
    return data.decode("utf-8", "replace")
