"""Loading a trained stage for use by another: its config, its network, and its parameters only.

A later stage (or the sampling pipeline) names an earlier stage's directory — a training workdir
or a bundle's stage folder, which share one layout: `config.json` and `checkpoints/<step>/`. The
network is built from the stored config (`stage_models.build_model`, no training Task); only
`params` is read (Orbax partial restore), so an optimizer state twice the model's size is never
loaded, and the parameters land sharded onto the caller's mesh by the stage's logical axes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from melody_jax.frozen.stage_models import build_model
from melody_jax.nn.lora import merge, split
from melody_jax.training import lora
from melody_jax.training.checkpoint import check_compatible, param_signature, reading
from melody_jax.training.sharding import Rules, sharded_shapes
from melody_jax.training.stage_config import read_stage_config
from melody_jax.training.state import overlay

__all__ = ["KEEP", "Stage", "load_stage", "read_stage_config"]

KEEP = {"vae_gan": ("generator",), "codec": ("generator", "generator_state")}  # a GAN's critic stays behind


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    """A loaded stage: the config it was trained with, its network (None: k-means, RVQ), params, step."""

    config: ml_collections.ConfigDict
    model: nn.Module | None
    params: Any
    step: int


def load_stage(directory: str, stage: str, mesh: jax.sharding.Mesh, rules: Rules, *, field: str,
               keep: Sequence[str] | None = None, weights: str = "raw", step: int | None = None) -> Stage:
    """The stage stored in `directory`, its newest parameters (or those of `step`) on `mesh`.

    `keep` names the top-level parameter groups to read (e.g. a GAN's "generator"); None reads all.
    `weights="ema"` reads the run's EMA of the parameters where it kept one (else the raw ones).
    A stage fine-tuned with LoRA comes back as the plain stage with its adapters merged: its checkpoint
    holds the adapters, its base is the `train.init_from` step recorded beside them.
    """
    config = read_stage_config(directory, stage, field)
    built = build_model(config)
    adapted = lora.rank(config) > 0
    abstract, _ = sharded_shapes(lora.with_adapters(built.init, config) if adapted else built.init,
                                 jax.random.key(0), mesh, rules)
    if adapted:
        abstract = split(abstract)[1]
    if keep is not None:
        abstract = {k: abstract[k] for k in keep if k in abstract}
    with reading(directory) as ckpt:
        if step is None:
            step, meta = ckpt.newest(f"{field}={directory!r} holds no checkpoint of the {stage} stage")
        else:
            meta = ckpt.read_meta(step)
        if keep is not None:
            saved = meta.get("param_signature", {})
            meta = {**meta, "param_signature": {n: s for n, s in saved.items() if n.split("/")[0] in keep}}
        check_compatible(meta, stage, param_signature(abstract), directory)
        params = ckpt.restore_params(step, abstract, "ema" if weights == "ema" and meta.get("ema") else "params")
    if adapted:
        base = meta["init_from"]
        plain = load_stage(base["directory"], stage, mesh, rules, field=f"{field} (the base its LoRA adapters tune)",
                           weights="ema" if base["key"] == "ema" else "raw", step=base["step"])
        params = merge(overlay(plain.params, params), float(config.model.lora.alpha))
    return Stage(config, built.module, params, step)
