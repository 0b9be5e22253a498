"""The config a stage directory was trained with (a training workdir or a bundle's stage folder).

Here, on the ground floor, because `train.init_from` checks it as well as the frozen loader does.
"""
from __future__ import annotations

import os

import ml_collections

from melody_jax.training import config as config_lib
from melody_jax.training.errors import WorkdirError


def read_stage_config(directory: str, stage: str, field: str) -> ml_collections.ConfigDict:
    """The config `stage` was trained with in `directory`; `field` names the setting that pointed here."""
    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        raise WorkdirError(f"{field}={directory!r} has no config.json (train the {stage} stage there)")
    with open(path) as f:
        config = config_lib.from_json(f.read())
    if config.get("stage") != stage:
        raise WorkdirError(f"{field}={directory!r} holds the {config.get('stage')!r} stage, not {stage!r}")
    return config
