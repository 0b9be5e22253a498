"""Semantic LM stage (DESIGN §4.4, §7): next-token loss on semantic tokens after 12 MuLan tokens.

Data sources (`config.data.source`):
- "synthetic": a rule that a small model can learn and a test can check. With K = data.synthetic_codes,
  S = data.num_strides and M MuLan tokens m_q ~ U[0, K): s_t = (s_{t-1} + b_t) mod K, s_{-1} = 0, with
  steps b_t = 1 + (m_{t mod M} mod S). Each token depends on the previous one and on a prefix token, and
  the steps cannot be read off earlier tokens. Batches are a pure function of (seed, batch index), so
  the iterator's position is one integer.
- "cached": TFRecords from `melody_jax.tokenizers.token_records.write_token_records`.
- "frozen_models": tokenising audio inside the step needs stages that do not exist yet (refused).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from melody_jax.models.semantic_lm import SemanticLM
from melody_jax.tokenizers.token_records import TokenRecordIterator
from melody_jax.training.config import one_of, positive, require
from melody_jax.training.sharding import host_to_global, process_rows
from melody_jax.training.task import Batch, Task

SOURCES = ("synthetic", "cached", "frozen_models")
EVAL_SEED_OFFSET = 1_000_003


def synthetic_tokens(seed: int, index: int, batch: int, num_mulan_tokens: int, semantic_len: int, codes: int,
                     num_strides: int) -> tuple[np.ndarray, np.ndarray]:
    """(mulan int32 [batch, M], semantic int32 [batch, T]) following the module docstring's rule."""
    rng = np.random.default_rng([seed, index])
    start = rng.integers(0, codes, (batch, 1))
    stride = rng.integers(1, num_strides + 1, (batch, 1))
    stream = ((start + stride * np.arange(num_mulan_tokens + semantic_len)) % codes).astype(np.int32)
    return stream[:, :num_mulan_tokens], stream[:, num_mulan_tokens:]


def rule_targets(mulan: np.ndarray, semantic: np.ndarray, codes: int) -> np.ndarray:
    """The token the rule prescribes at each position of `semantic`, given its actual previous token."""
    stride = (mulan[:, -1:] - mulan[:, -2:-1]) % codes
    previous = np.concatenate([mulan[:, -1:], semantic[:, :-1]], axis=1)
    return (previous + stride) % codes


class SyntheticTokenIterator:
    """Endless global batches of the synthetic rule; `get_state()` is the number handed out."""

    def __init__(self, config, mesh, seed: int, index: int = 0):
        self.config, self.mesh, self.seed, self.index = config, mesh, seed, index

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        c = self.config
        mulan, semantic = synthetic_tokens(self.seed, self.index, c.train.batch_size, c.model.num_mulan_tokens,
                                           c.data.semantic_len, c.data.synthetic_codes, c.data.num_strides)
        self.index += 1
        rows = process_rows(c.train.batch_size)
        return host_to_global({"mulan_tokens": mulan[rows], "semantic_tokens": semantic[rows]}, self.mesh)

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


class SemanticLMTask(Task):
    name = "semantic_lm"

    def validate(self) -> None:
        c = self.config
        m, d = c.model, c.data
        one_of(c, "data.source", SOURCES)
        require(d.source != "frozen_models",
                "config.data.source='frozen_models' needs the frozen stages mulan + rvq (MuLan tokens) and "
                "ssl + kmeans (semantic tokens), which do not exist yet; use 'synthetic', or 'cached' with "
                "records from melody_jax.tokenizers.token_records.write_token_records")
        positive(c, "model.num_layers", "model.embed_dim", "model.num_heads", "model.mlp_dim",
                 "model.num_mulan_tokens", "model.mulan_codebook_size", "model.semantic_vocab_size",
                 "data.semantic_len", "data.shuffle_buffer")
        require(m.embed_dim % m.num_heads == 0,
                f"config.model.num_heads={m.num_heads} does not divide embed_dim={m.embed_dim}")
        require((m.embed_dim // m.num_heads) % 2 == 0,
                f"config.model.embed_dim={m.embed_dim} / num_heads={m.num_heads} must be even (rotary)")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")
        if d.source == "synthetic":
            positive(c, "data.synthetic_codes", "data.num_strides")
            require(d.synthetic_codes <= min(m.mulan_codebook_size, m.semantic_vocab_size),
                    f"config.data.synthetic_codes={d.synthetic_codes} exceeds the MuLan codebook or semantic vocabulary")
        else:
            require(bool(d.path), "config.data.path is empty; data.source='cached' needs a TFRecord file or glob")

    @property
    def model(self) -> SemanticLM:
        m = self.config.model
        return SemanticLM(num_layers=m.num_layers, embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                          num_prefix=m.num_mulan_tokens, prefix_codebook_size=m.mulan_codebook_size,
                          vocab_size=m.semantic_vocab_size, dtype=jnp.dtype(m.dtype), remat=m.remat)

    def init_params(self, rng: jax.Array) -> Any:
        length = self.config.model.num_mulan_tokens + self.config.data.semantic_len - 1
        return self.model.init(rng, jnp.zeros((1, length), jnp.int32))["params"]

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        semantic = batch["semantic_tokens"]
        stream = jnp.concatenate([batch["mulan_tokens"], semantic], axis=1)
        # logits at position p predict stream[p + 1]: the last MuLan position predicts the first semantic token
        logits = self.model.apply({"params": params}, stream[:, :-1])[:, self.config.model.num_mulan_tokens - 1:]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, semantic).mean()
        return loss, {"accuracy": (logits.argmax(-1) == semantic).mean()}

    def _records(self, mesh, path: str) -> TokenRecordIterator:
        c = self.config
        return TokenRecordIterator(path, global_batch_size=c.train.batch_size, mesh=mesh, seed=c.seed,
                                   num_mulan_tokens=c.model.num_mulan_tokens, semantic_len=c.data.semantic_len,
                                   vocab_sizes=(c.model.mulan_codebook_size, c.model.semantic_vocab_size),
                                   shuffle_buffer=c.data.shuffle_buffer)

    def train_iterator(self, mesh):
        if self.config.data.source == "cached":
            return self._records(mesh, self.config.data.path)
        return SyntheticTokenIterator(self.config, mesh, self.config.seed)

    def eval_iterator(self, mesh):
        if self.config.data.source == "cached":
            return self._records(mesh, self.config.data.eval_path) if self.config.data.eval_path else None
        return SyntheticTokenIterator(self.config, mesh, self.config.seed + EVAL_SEED_OFFSET)

    def describe(self, params: Any) -> dict[str, int]:
        return super().describe(params["decoder"])
