"""Bundles of untrained stages: real files on the real code paths, without training.

Each stage's workdir gets its config.json and a step-0 checkpoint of its initial state, exactly as
`launch.train` lays them out, and `bundle.assemble` checks and copies them. Tests sample from such
bundles (what they check does not depend on trained weights) and the speed benchmarks time them
(speed does not either).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import ml_collections
from flax import linen as nn

from melody_jax.pipelines.bundle import assemble
from melody_jax.tasks.registry import get_task
from melody_jax.training import config as config_lib
from melody_jax.training.checkpoint import Checkpointer, param_signature
from melody_jax.training.sharding import DEFAULT_RULES, make_mesh


def init_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """config.json + a step-0 checkpoint of the stage's initial state."""
    task = get_task(config)
    state = jax.jit(lambda r: nn.meta.unbox(task.init_state(r)))(jax.random.key(config.seed))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    ckpt = Checkpointer(workdir, keep=1, every=1)
    ckpt.save(0, state, {}, {"stage": config.stage, "param_signature": param_signature(state.params)}, force=True)
    ckpt.wait()
    ckpt.close()


def untrained_bundle(root: str, configs: Mapping[str, ml_collections.ConfigDict], stages: tuple[str, ...],
                     name: str = "bundle") -> str:
    """Initialises `stages` under `root` and assembles them into `root/name`; returns that path."""
    for stage in stages:
        init_workdir(configs[stage], os.path.join(root, stage))
    out = os.path.join(root, name)
    assemble(out, {s: os.path.join(root, s) for s in stages}, make_mesh({"data": 1}, jax.devices()[:1]),
             DEFAULT_RULES, stages)
    return out
