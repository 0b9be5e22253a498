"""Stage name → its training Task: the one place a config's `stage` is resolved to code.

Modules import lazily so a CLI pays only for its own stage.
"""
from __future__ import annotations

import importlib

import ml_collections

from melody_jax.training.errors import ConfigError
from melody_jax.training.lora import wrap
from melody_jax.training.task import Task

REGISTRY: dict[str, str] = {
    "toy_lm": "melody_jax.tasks.toy_lm:ToyLMTask",
    "dpd": "melody_jax.tasks.dpd:DPDTask",
    "semantic_lm": "melody_jax.tasks.semantic_lm:SemanticLMTask",
    "mulan": "melody_jax.tasks.mulan:MuLanTask",
    "rvq": "melody_jax.tasks.rvq:RVQTask",
    "vae_gan": "melody_jax.tasks.vae_gan:VAEGANTask",
    "ssl": "melody_jax.tasks.ssl:SSLTask",
    "kmeans": "melody_jax.tasks.kmeans:KMeansTask",
    "codec": "melody_jax.tasks.codec:CodecTask",
    "musicgen": "melody_jax.tasks.musicgen:MusicGenTask",
}


def get_task(config: ml_collections.ConfigDict) -> Task:
    """The Task of `config.stage` (wrapped for LoRA when its config asks for adapters)."""
    stage = config.get("stage")
    if stage not in REGISTRY:
        raise ConfigError(f"config.stage={stage!r} is not a registered stage; known: {sorted(REGISTRY)}")
    module, cls = REGISTRY[stage].split(":")
    return wrap(getattr(importlib.import_module(module), cls)(config))
