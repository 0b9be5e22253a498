"""Loading a trained stage for use by another: its config, and its parameters only.

A later stage (or the sampling pipeline) names an earlier stage's directory — a training workdir
or a bundle's stage folder, which share one layout: `config.json` and `checkpoints/<step>/`. Only
`params` is read (Orbax partial restore), so an optimizer state twice the model's size is never
loaded, and the parameters land sharded onto the caller's mesh by the stage's logical axes.

A stage that runs a frozen one inside its own jitted step (semantic tokens or codec codes made from
audio crops on the fly) feeds that stage's parameters through `FrozenInputs`: they ride along with
every batch under "frozen", so they are jit arguments, which XLA neither embeds as constants nor
copies (they already sit on the mesh, laid out by their own logical axes).
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections

from melody_jax.training import config as config_lib
from melody_jax.training.checkpoint import Checkpointer, check_compatible, param_signature
from melody_jax.training.errors import WorkdirError
from melody_jax.training.lora import LoRATask, merge
from melody_jax.training.sharding import sharded_shapes
from melody_jax.training.task import Task, get_task


def read_config(directory: str, stage: str, field: str) -> ml_collections.ConfigDict:
    """The config a stage was trained with; `field` names the setting that pointed here."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise WorkdirError(f"{field}={directory!r} has no config.json (train the {stage} stage there)")
    with open(path) as f:
        config = config_lib.from_json(f.read())
    if config.get("stage") != stage:
        raise WorkdirError(f"{field}={directory!r} holds the {config.get('stage')!r} stage, not {stage!r}")
    return config


def load_stage(directory: str, stage: str, mesh: jax.sharding.Mesh, rules, *, field: str = "stage directory",
               keep: Sequence[str] | None = None, weights: str = "raw") -> tuple[Task, Any, int]:
    """(task as configured there, its newest parameters on `mesh`, the step they come from).

    `keep` names the top-level parameter groups to read (e.g. a GAN's "generator"); None reads all.
    `weights="ema"` reads the run's EMA of the parameters where it kept one (else the raw ones).
    A stage fine-tuned with LoRA comes back as the plain stage with its adapters merged.
    """
    task = get_task(read_config(directory, stage, field))
    abstract, _ = sharded_shapes(task.init_params, jax.random.key(0), mesh, rules)
    if keep is not None:
        abstract = {k: abstract[k] for k in keep if k in abstract}
    ckpt = Checkpointer(directory, keep=1, every=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise WorkdirError(f"{field}={directory!r} holds no checkpoint of the {stage} stage")
        meta = ckpt.read_meta(step)
        if keep is not None:
            saved = meta.get("param_signature", {})
            meta = {**meta, "param_signature": {n: s for n, s in saved.items() if n.split("/")[0] in keep}}
        check_compatible(meta, stage, param_signature(abstract), directory)
        params = ckpt.restore_params(step, abstract, "ema" if weights == "ema" and meta.get("ema") else "params")
    finally:
        ckpt.close()
    if isinstance(task, LoRATask):
        return task.inner, merge(params, task.config), step
    return task, params, step


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
