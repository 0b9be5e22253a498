"""`train.init_from=DIR`: start a stage from the parameters of a workdir or a bundle of that stage.

Parameters are matched by name and shape (a source written with the other `model.scan_layers` is
converted, `training/layer_layout.py`), top-level group by group: every group the source holds
must exist in this run with the same names and shapes; groups it lacks start from their init (a
bundle keeps a GAN's generator only, so its critic starts fresh; LoRA adapters start at zero).
The first mismatch is one line naming the parameter, raised before anything is written. The
source's EMA weights are used where its run kept them (what a bundle would export), restored
straight onto this run's mesh by its logical axes (Orbax partial restore: no optimizer state read).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ml_collections
from absl import logging

from melody_jax.training import ema, layer_layout
from melody_jax.training.checkpoint import param_signature, reading
from melody_jax.training.errors import WorkdirError
from melody_jax.training.stage_config import read_stage_config
from melody_jax.training.state import TrainState

BUNDLE_MANIFEST = "bundle.json"  # pipelines.bundle.MANIFEST (not imported: pipelines import training)


@dataclass(frozen=True)
class Source:
    directory: str
    step: int
    key: str  # "params" or "ema"
    groups: tuple[str, ...]
    layout: Any = None  # the source's abstract parameters when written in the other layer layout


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
    directory = _stage_dir(config.train.init_from, config.stage, field)
    read_stage_config(directory, config.stage, field)
    with reading(directory) as ckpt:
        step, meta = ckpt.newest(f"{field} holds no checkpoint")
    saved = meta.get("param_signature", {})
    layout = layer_layout.saved_layout(abstract_params, saved)
    run = param_signature(abstract_params if layout is None else layout)
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
        if source.layout is None:
            restored = ckpt.restore_params(source.step, {g: abstract.params[g] for g in source.groups}, source.key)
        else:  # written with the other model.scan_layers: every group, layers stacked or unstacked
            restored = ckpt.restore_params(source.step, source.layout, source.key)
            restored = layer_layout.relayout_trees(restored, source.layout, abstract.params, place=True)
    logging.info("initialised %s from %s (step %d, %s)", ", ".join(source.groups), source.directory, source.step,
                 source.key)
    state = state.replace(params={**state.params, **restored}, ema=None)
    return ema.match_config(state, config, shardings)


def requested(config: ml_collections.ConfigDict) -> bool:
    return bool(config.train.get("init_from"))

