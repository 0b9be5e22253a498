"""`train.init_from=DIR`: start a stage from the parameters of a workdir or a bundle of that stage.

Parameters are matched by name and shape (a source written with the other `model.scan_layers` is
converted, `training/layer_layout.py`), top-level group by group: every group the source holds
must exist in this run with the same names and shapes; groups it lacks start from their init (a
bundle keeps a GAN's generator only, so its critic starts fresh), and so do LoRA adapters, which a
source never provides. The first mismatch is one line naming the parameter, raised before anything
is written; so is a source fine-tuned with LoRA (its checkpoints hold adapters only: start from a
bundle of it made with `--merge_lora`). The source's EMA weights are used where its run kept them
(what a bundle would export), restored straight onto this run's mesh by its logical axes (Orbax
partial restore: no optimizer state read). `Source.record` goes into the run's checkpoint meta, so
a resume (and the frozen loader) can find the very step a LoRA run's frozen base came from.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
from absl import logging

from melody_jax.nn.lora import split
from melody_jax.training import ema, layer_layout
from melody_jax.training.checkpoint import param_signature, reading
from melody_jax.training.errors import WorkdirError
from melody_jax.training.lora import rank
from melody_jax.training.stage_config import read_stage_config
from melody_jax.training.state import TrainState, overlay

BUNDLE_MANIFEST = "bundle.json"  # pipelines.bundle.MANIFEST (not imported: pipelines import training)


@dataclasses.dataclass(frozen=True)
class Source:
    directory: str
    step: int
    key: str  # "params" or "ema"
    groups: tuple[str, ...]
    layout: Any = None  # the source's abstract parameters when written in the other layer layout

    def record(self) -> dict[str, Any]:
        return {"directory": self.directory, "step": self.step, "key": self.key}


def _stage_dir(directory: str, stage: str, field: str) -> str:
    if not os.path.exists(os.path.join(directory, BUNDLE_MANIFEST)):
        return directory
    inside = os.path.join(directory, stage)
    if not os.path.isdir(inside):
        raise WorkdirError(f"{field} is a bundle without the {stage} stage")
    return inside


def check(config: ml_collections.ConfigDict, abstract_params: Any) -> Source:
    """Where and what to restore; one-line WorkdirError for the first way the source does not fit."""
    field = f"config.train.init_from={config.train.init_from!r}"
    directory = os.path.abspath(_stage_dir(config.train.init_from, config.stage, field))
    if rank(read_stage_config(directory, config.stage, field)):
        raise WorkdirError(f"{field} was fine-tuned with LoRA and holds its adapters only; start from a bundle of "
                           "it made with `launch.bundle --merge_lora`")
    with reading(directory) as ckpt:
        step, meta = ckpt.newest(f"{field} holds no checkpoint")
    saved, base = meta.get("param_signature", {}), split(abstract_params)[0]
    layout = layer_layout.saved_layout(base, saved)
    run = param_signature(base if layout is None else layout)
    groups = sorted({n.split("/")[0] for n in saved})
    for name in sorted(set(saved) | {n for n in run if n.split("/")[0] in groups}):
        if saved.get(name) != run.get(name):
            raise WorkdirError(f"{field} does not fit this model: parameter {name} has shape {saved.get(name)} there "
                               f"and {run.get(name)} here")
    return Source(directory, step, "ema" if meta.get("ema") else "params", tuple(groups), layout)


def load(source: Source, state: TrainState, abstract: TrainState, config: ml_collections.ConfigDict,
         shardings: TrainState) -> TrainState:
    """`state` with the source's parameters in place of its initial ones (the EMA restarts from them)."""
    with reading(source.directory) as ckpt:
        base = split(abstract.params)[0]
        if source.layout is None:
            restored = ckpt.restore_params(source.step, {g: base[g] for g in source.groups}, source.key)
        else:  # written with the other model.scan_layers: every group, layers stacked or unstacked
            restored = ckpt.restore_params(source.step, source.layout, source.key)
            restored = layer_layout.relayout_trees(restored, source.layout, base, place=True)
    logging.info("initialised %s from %s (step %d, %s)", ", ".join(source.groups), source.directory, source.step,
                 source.key)
    state = state.replace(params=overlay(state.params, restored), ema=None)
    return ema.match_config(state, config, shardings)


def recorded(meta: dict[str, Any], source: Source | None, workdir: str) -> Source | None:
    """The source a checkpoint's run started from (the step it recorded), for a resume that rebuilds the
    parameters its checkpoints do not hold; the run's config must still name it."""
    record = meta.get("init_from")
    if record is None:
        return None
    if source is None or source.directory != record["directory"]:
        raise WorkdirError(f"workdir {workdir} was started from config.train.init_from={record['directory']!r}; "
                           "resume with that")
    return dataclasses.replace(source, step=record["step"], key=record["key"])


def requested(config: ml_collections.ConfigDict) -> bool:
    return bool(config.train.get("init_from"))

