"""Endless global batches from a pure function of the batch index, so the resume position is one int.

Every synthetic training source (toy tokens, synthetic latents and token pairs) is deterministic in
(seed, index); each host builds the global batch and keeps its own rows.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from melody_jax.training.sharding import host_to_global, process_rows


class IndexedBatches:
    """`make_batch(index) -> {name: np.ndarray [global_batch, ...]}`; `get_state()` = batches handed out."""

    def __init__(self, make_batch: Callable[[int], dict[str, np.ndarray]], global_batch_size: int,
                 mesh: jax.sharding.Mesh, index: int = 0):
        self.make_batch, self.global_batch_size, self.mesh, self.index = make_batch, global_batch_size, mesh, index

    def __iter__(self) -> "IndexedBatches":
        return self

    def __next__(self) -> dict[str, jax.Array]:
        batch = self.make_batch(self.index)
        self.index += 1
        rows = process_rows(self.global_batch_size)
        return host_to_global({k: v[rows] for k, v in batch.items()}, self.mesh)

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])
