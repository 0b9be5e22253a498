"""A frozen stage's parameters riding along with every batch of a stage that runs it in its own step.

A stage that runs a frozen one inside its jitted step (semantic tokens or codec codes made from
audio crops on the fly) gets that stage's parameters under "frozen" in every batch, so they are jit
arguments, which XLA neither embeds as constants nor copies (they already sit on the mesh, laid out
by their own logical axes).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any


class FrozenInputs:
    """Batches of `inputs` (only `keys` of them, None = all) plus `{"frozen": params}`; same state."""

    def __init__(self, inputs: Iterator[dict[str, Any]], params: Any, keys: Sequence[str] | None = None):
        self.inputs, self.params, self.keys = inputs, params, keys

    def __iter__(self) -> "FrozenInputs":
        return self

    def __next__(self) -> dict[str, Any]:
        batch = next(self.inputs)
        if self.keys is not None:
            batch = {k: batch[k] for k in self.keys}
        return {**batch, "frozen": self.params}

    def get_state(self) -> dict[str, Any]:
        return self.inputs.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.inputs.set_state(state)
