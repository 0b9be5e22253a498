"""Text → T5 token ids with the tokenizer that ships with a checkpoint (`tokenizer.json`, read by `tokenizers`).

The public MusicGen checkpoints carry T5's SentencePiece vocabulary as a `tokenizers` JSON file; it
holds the normalizer, the pre-tokenizer and the post-processor that appends `</s>`, so encoding
with it gives transformers' ids exactly. Batches are padded with the pad id to their longest prompt,
as transformers pads them (T5's relative positions do not depend on the padded length).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from melody_jax.training.errors import UserError


class T5Tokenizer:
    """`tokenizer(texts, max_length)` → (int32 ids `[B, L]`, bool mask `[B, L]`), L = the longest ≤ max_length."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers package raises a bare Exception on a bad file
            raise UserError(f"cannot read the tokenizer {path}: {str(e).splitlines()[0]}") from None
        self.tokenizer.no_padding()  # a saved file may carry padding/truncation settings; we pad ourselves
        self.tokenizer.no_truncation()
        pad = self.tokenizer.token_to_id("<pad>")
        self.pad_id = 0 if pad is None else pad

    def __call__(self, texts: Sequence[str], max_length: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """`multiple` rounds the padded length up (at most to max_length): fewer shapes to compile."""
        ids = [e.ids[:max_length] for e in self.tokenizer.encode_batch(list(texts))]
        longest = max(1, max(len(i) for i in ids))
        length = max(longest, min(max_length, -(-longest // multiple) * multiple))
        tokens = np.full((len(ids), length), self.pad_id, np.int32)
        mask = np.zeros((len(ids), length), bool)
        for row, seq in enumerate(ids):
            tokens[row, : len(seq)], mask[row, : len(seq)] = seq, True
        return tokens, mask
