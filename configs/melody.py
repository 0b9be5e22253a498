"""The MeLoDy stage graph (DESIGN §4) and the demo's recipe: one place for the order the seven
stages train in, the trained stages each one reads, and the per-stage changes of a run.

`launch.demo`, `launch.bundle`, `launch.tokenize` and the test fixtures read the graph from here.
The tiny presets compose as they are (sample rates, vocabularies, MuLan/RVQ sizes, latent sizes:
what `pipelines.bundle.check_fit` checks), so a recipe changes only data, upstream stages, steps, the SSL
objective and the DPD's training angles (`DEMO_CHANGES`).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import ml_collections

from configs.common import stage_config

STAGES = ("vae_gan", "ssl", "kmeans", "mulan", "rvq", "semantic_lm", "dpd")  # each after the stages it reads
# The trained stages each stage reads. k-means and RVQ load theirs; the semantic LM loads its four in
# the step (data.source="frozen_models") or, like the DPD, reads their outputs cached by `launch.tokenize`
# (data.source="cached").
UPSTREAM: dict[str, tuple[str, ...]] = {
    "vae_gan": (), "ssl": (), "kmeans": ("ssl",), "mulan": (), "rvq": ("mulan",),
    "semantic_lm": ("ssl", "kmeans", "mulan", "rvq"), "dpd": ("vae_gan", "ssl", "kmeans"),
}
# What `launch.tokenize` runs over a prepared dataset: the stages the cached records come from.
TOKENIZE_STAGES = tuple(s for s in STAGES if s in UPSTREAM["semantic_lm"] + UPSTREAM["dpd"])
TOKENS = "tokens"  # the demo's cache folder of records (its training split only), under its root
TOKEN_CROP_SECONDS = 0.64  # the tiny DPD's window: 160 latent frames, 16 semantic tokens
# The demo's steps per stage at steps_scale 1 (k-means and RVQ fit: their steps are iterations/levels).
DEMO_STEPS = {"vae_gan": 500, "ssl": 400, "mulan": 500, "semantic_lm": 1000, "dpd": 2400}
# The demo's changes to the tiny presets beyond data and steps (README "Evaluation", measured on the demo's
# stage table): HuBERT (group-norm front end, no feature penalty) on log-mel, chroma and flux target codebooks.
# Log-mel + chroma tokens carry drums (probe 0.95 against wav2vec 2.0's 0.58) but not the beat (onset
# envelope R² 0.07, so the DPD rendering their own tokens keeps tempo 0.11); the flux codebook makes them mark
# onsets (R² 0.67, drums 1.00, rendered tempo 0.50) at the cost of the key probe (0.34 → 0.13).
DEMO_CHANGES: dict[str, dict] = {
    "ssl": {"model.objective": "hubert", "model.conv_norm": "group", "model.feature_penalty_weight": 0.0,
            "model.target_features": '["logmel", "chroma", "flux"]'},
    # Half the DPD's examples train on a continuation step's angles (first chunks clean): 10-s outputs are
    # continuation windows, and without it their later windows drift into noise (README "Evaluation").
    "dpd": {"model.continuation_share": 0.5, "train.ema_decay": 0.999},
}


class Recipe(NamedTuple):
    """A named budget of `launch.demo --recipe`: synthetic clips prepared, the multiplier of DEMO_STEPS and
    the synthetic prompts the evaluation generates (never trained on: another seed than the data)."""

    clips: int
    steps_scale: float
    eval_prompts: int


# "demo" is `make demo` (≤ 20 min on 2 cores). "2h" is the ≤ 2-hour recipe of issue 23 [choice]: stage steps
# × 8 and 384 clips (the longer LM and DPD runs see new crops). Both evaluate the 32 prompts; the
# tokenize and evaluation passes grow with clips and prompts, not steps.
RECIPES = {"demo": Recipe(clips=96, steps_scale=1.0, eval_prompts=32),
           "2h": Recipe(clips=384, steps_scale=8.0, eval_prompts=32)}


def upstream_field(stage: str, upstream: str) -> str:
    """The field of `stage` naming its trained `upstream` stage's directory."""
    return f"upstream.{upstream}"


def upstream_overrides(stage: str, workdirs: Mapping[str, str]) -> dict[str, str]:
    """Overrides pointing a stage that loads its upstream stages (k-means, RVQ, the semantic LM on
    frozen models) at their workdirs."""
    return {upstream_field(stage, s): workdirs[s] for s in UPSTREAM[stage]}


def demo_configs(data: str, root: str, steps_scale: float = 1.0) -> dict[str, ml_collections.ConfigDict]:
    """The demo's seven configs: tiny presets with `DEMO_CHANGES` on the prepared dataset `data`, k-means
    and RVQ reading the SSL and MuLan runs under `root`, the LM and the DPD reading the records cached there
    (no held-out records: the demo evaluates the bundle, not these two stages)."""
    workdirs = {s: os.path.join(root, s) for s in STAGES}
    audio = {"data.path": data}
    cached = {"data.source": "cached", "data.path": os.path.join(root, TOKENS), "data.eval_split": ""}
    changes = {"vae_gan": audio, "ssl": audio, "mulan": audio, "kmeans": upstream_overrides("kmeans", workdirs),
               "rvq": upstream_overrides("rvq", workdirs), "semantic_lm": cached, "dpd": cached}
    configs = {}
    for stage in STAGES:
        steps = {"train.num_steps": max(1, int(DEMO_STEPS[stage] * steps_scale))} if stage in DEMO_STEPS else {}
        configs[stage] = stage_config(stage, "tiny", {**changes[stage], **DEMO_CHANGES.get(stage, {}), **steps,
                                                      "train.tensorboard": False})
    return configs
