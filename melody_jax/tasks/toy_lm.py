"""Toy LM stage: the LLaMA-style decoder on synthetic stride sequences (proves the training core).

Data (`data.source="synthetic"`): x_0 ~ U[0, V), x_t = (x_{t-1} + b) mod V with b ~ U{1..num_strides} per
sequence. Batches are a pure function of (split's stream seed, batch index), so the iterator's position
is one integer.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax

from data_pipeline.indexed import IndexedBatches
from melody_jax.frozen.stage_models import build_model
from melody_jax.models.transformer import DecoderLM
from melody_jax.tasks.sources import SourcedTask, stream_seed
from melody_jax.training.config import positive, require
from melody_jax.training.task import Batch


def stride_sequences(seed: int, index: int, batch: int, seq_len: int, vocab: int, num_strides: int) -> np.ndarray:
    rng = np.random.default_rng([seed, index])
    start = rng.integers(0, vocab, (batch, 1))
    stride = rng.integers(1, num_strides + 1, (batch, 1))
    return ((start + stride * np.arange(seq_len)[None]) % vocab).astype(np.int32)


class ToyLMTask(SourcedTask):
    name = "toy_lm"
    sources = ("synthetic",)

    def validate(self) -> None:
        m = self.config.model
        self.check_data()
        positive(self.config, "model.vocab_size", "model.num_layers", "model.embed_dim", "model.num_heads",
                 "model.mlp_dim", "data.seq_len", "data.num_strides")
        require(m.embed_dim % m.num_heads == 0,
                f"config.model.num_heads={m.num_heads} does not divide embed_dim={m.embed_dim}")
        require((m.embed_dim // m.num_heads) % 2 == 0,
                f"config.model.embed_dim={m.embed_dim} / num_heads={m.num_heads} must be even (rotary)")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")

    @property
    def model(self) -> DecoderLM:
        return build_model(self.config).module

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        tokens = batch["tokens"]
        logits = self.model.apply({"params": params}, tokens[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
        accuracy = (logits.argmax(-1) == tokens[:, 1:]).mean()
        return loss, {"accuracy": accuracy}

    def batches(self, mesh, split: str) -> IndexedBatches:
        c, seed = self.config, stream_seed(self.config.seed, split)

        def make(index: int) -> dict[str, np.ndarray]:
            return {"tokens": stride_sequences(seed, index, c.train.batch_size, c.data.seq_len,
                                               c.model.vocab_size, c.data.num_strides)}

        return IndexedBatches(make, c.train.batch_size, mesh)
