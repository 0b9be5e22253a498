"""The MeLoDy stage graph (DESIGN §4) and the demo's recipe: one place for the order the seven
stages train in, the trained stages each one reads, and the per-stage changes of a run.

`launch.demo`, `launch.bundle`, `launch.tokenize` and the test fixtures read the graph from here.
The tiny presets compose as they are (sample rates, vocabularies, MuLan/RVQ sizes, latent sizes:
what `pipelines.bundle.check_fit` checks), so a recipe changes only data, upstream stages, steps and what
`DEMO_CHANGES` and its own changes (`LONG_CHANGES`) name inside stages: none of them touches those sizes.
"""
from __future__ import annotations

import math
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


class Cache(NamedTuple):
    """A cache of records `launch.tokenize` writes for a stage (its training split only), under the demo's
    root: crops of `seconds`, one every `hop_seconds`, of the clips of `dataset` (see DATASETS), holding the
    model `fields` the stage reads (`data_pipeline.tokenized.FIELDS`)."""

    folder: str
    seconds: float
    hop_seconds: float
    dataset: str
    fields: tuple[str, ...]


# The tiny DPD's window: 0.64 s (160 latent frames, 16 semantic tokens), whole crops. The LM's crops are
# three of those (48 tokens, one every 0.32 s): 12 tokens of context (0.48 s) cannot carry a beat slower than
# 125 BPM from one LM step to the next, 44 carry one down to 34 BPM; MuLan's audio tower (2-s windows) also
# hears more of each crop. (3.84-s crops of 10-s clips kept more beats in continuations, but not more of text
# prompts' tempo, and took the demo to 25 minutes: README "What moved the LM's continuations".) Each cache
# holds the fields its stage reads: the LM's, no latents.
CACHES = {"dpd": Cache("tokens", 0.64, 0.64, "audio", ("latents", "semantic_tokens")),
          "semantic_lm": Cache("lm_tokens", 1.92, 0.32, "captions",
                               ("semantic_tokens", "mulan_tokens", "mulan_text_tokens"))}
# The demo's two synthetic datasets (`Recipe`) and the stages reading each directly (the rest read caches, or
# fit on their upstream stage's dataset). MuLan, its RVQ and the semantic LM learn what captions say, which takes
# many captions; the VAE-GAN, SSL and DPD do better at the demo's steps on fewer clips (README "Evaluation").
DATASETS = {"audio": ("vae_gan", "ssl"), "captions": ("mulan",)}
# The demo's steps per stage at steps_scale 1 (k-means and RVQ fit: their steps are iterations/levels).
DEMO_STEPS = {"vae_gan": 500, "ssl": 400, "mulan": 1500, "semantic_lm": 3000, "dpd": 2400}
# Steps no recipe exceeds: at × 8, MuLan's (on 2 cores 0.11 s a step on mel bands, 0.17 s on the 2-hour recipe's
# semitone bands) would take 22–34 minutes of the 2-hour recipe, the 4 × 128 LM's (0.07 s) 28 minutes.
STEP_CAPS = {"mulan": 6000, "semantic_lm": 12000}
# The demo's changes to the tiny presets beyond data and steps (README "Evaluation", measured on the demo's
# stage table): HuBERT (group-norm front end, no feature penalty) on log-mel, chroma and flux target codebooks.
# Log-mel + chroma tokens carry drums (probe 0.95 against wav2vec 2.0's 0.58) but not the beat (onset
# envelope R² 0.07, so the DPD rendering their own tokens keeps tempo 0.11); the flux codebook makes them mark
# onsets (R² 0.67, drums 1.00, rendered tempo 0.50) at the cost of the key probe (0.34 → 0.13). The onset-age
# codebook (at 4 × the weight) makes them differ at each place inside a beat instead of repeating one filler
# token until the next onset, so an LM can copy a period rather than count it (README "Evaluation").
DEMO_CHANGES: dict[str, dict] = {
    "ssl": {"model.objective": "hubert", "model.conv_norm": "group", "model.feature_penalty_weight": 0.0,
            "model.target_features": '["logmel", "chroma", "flux", "onset_age"]',
            "model.target_weights": "[1.0, 1.0, 1.0, 4.0]"},
    # Half the DPD's examples train on a continuation step's angles (first chunks clean): 10-s outputs are
    # continuation windows, and without it their later windows drift into noise (README "Evaluation").
    # The bundle's LM samples at temperature 0.3: it follows the prompt more (drums 0.78 → 0.88 on prompts of
    # another seed than the evaluation's, 1.0 → 0.5; on onset-age tokens 0.84 at 0.5, 0.88 at 0.3, 0.84 at 0.2),
    # at a cost in variety the tiny LM can afford.
    "dpd": {"model.continuation_share": 0.5, "train.ema_decay": 0.999, "sample.temperature": 0.3},
    # MuLan's text tower learns from 768 captions: word dropout keeps it from memorising them, and captions
    # (what prompts look like) are paired three times in four instead of half the time against tag lists.
    # Its text tokens of unseen captions probe drums at 0.88 instead of 0.75 (README "Evaluation").
    "mulan": {"train.word_dropout": 0.2, "data.caption_probability": 0.75},
    # Half the LM's rows are conditioned on their clip caption's MuLan text tokens, the prefix text prompts give
    # at sampling time (an LM trained on audio tokens alone never sees one); the other half keep audio prompts.
    # 4 layers of width 128 instead of tiny's 2 of 64: on onset-age tokens it keeps a given beat more often.
    "semantic_lm": {"data.text_token_share": 0.5, "model.num_layers": 4, "model.embed_dim": 128,
                    "model.mlp_dim": 256},
}


class Recipe(NamedTuple):
    """A named budget of `launch.demo --recipe`: synthetic clips prepared for the audio stages and for the
    caption stages (DATASETS), the multiplier of DEMO_STEPS, the synthetic prompts the evaluation generates
    (never trained on: another seed than the data) and the recipe's own per-stage changes over DEMO_CHANGES."""

    clips: int
    caption_clips: int
    steps_scale: float
    eval_prompts: int
    changes: Mapping[str, Mapping[str, object]] = {}


# "demo" is `make demo` (≤ 20 min on 2 cores). "2h" is the ≤ 2-hour recipe of issue 23 [choice]: stage steps
# × 8, 384 clips and 1536 captioned ones (the longer runs see new crops). Both evaluate the 32 prompts;
# the tokenize and evaluation passes grow with clips and prompts, not steps.
# The 2-hour recipe's changes (README "Evaluation", the 2-hour recipe): its SSL weighs the chroma codebook as much
# as onset age, which at 3200 steps keeps the key in the tokens (probe 0.36 against 0.13; at the demo's 400 steps the
# same weights cost drums and beat instead); its MuLan hears semitone bands, five octaves from A3 in one-octave
# patches, so that its towers can tie a caption's key to the audio (on mel bands neither tower reads the key). Its
# DPD is twice tiny's width: rendering true tokens it keeps the key in 0.41 of held-out clips instead of 0.22, and
# the evaluation's musicnn FAD falls from 60.5 to 49.1, instrument rises from 0.16 to 0.25 (32 min alone, not 21).
# Its MuLan also hears the onset envelope's autocorrelation (`tempo_lags`, 1.37 s): its embeddings then name a
# clip's tempo within 5 % in 0.44 of held-out clips instead of 0.16, its captions' in 0.49 instead of 0.19, and the
# evaluation's tempo rises to 0.56 (drums fall from 0.91 to 0.84). It does not hear the pitch-class profile
# (`chroma_profile`): its captions' embeddings then name the key, but the chain's drums fall to 0.66 and its key
# stays at 0.03 (README, "MuLan hears the key").
LONG_CHANGES: dict[str, dict] = {
    "ssl": {"model.target_weights": "[1.0, 4.0, 1.0, 4.0]"},
    "dpd": {"model.hidden_dim": 64, "model.mlp_dim": 128, "model.num_heads": 4},
    "mulan": {"model.frequency_scale": "semitone", "model.fmin": 220.0, "model.n_fft": 2048, "model.n_mels": 60,
              "model.patch_mels": 12, "model.tempo_lags": 128},
}
RECIPES = {"demo": Recipe(clips=96, caption_clips=768, steps_scale=1.0, eval_prompts=32),
           "2h": Recipe(clips=384, caption_clips=1536, steps_scale=8.0, eval_prompts=32, changes=LONG_CHANGES)}


def upstream_field(stage: str, upstream: str) -> str:
    """The field of `stage` naming its trained `upstream` stage's directory."""
    return f"upstream.{upstream}"


def upstream_overrides(stage: str, workdirs: Mapping[str, str]) -> dict[str, str]:
    """Overrides pointing a stage that loads its upstream stages (k-means, RVQ, the semantic LM on
    frozen models) at their workdirs."""
    return {upstream_field(stage, s): workdirs[s] for s in UPSTREAM[stage]}


def demo_configs(datasets: Mapping[str, str], root: str, steps_scale: float = 1.0,
                 recipe_changes: Mapping[str, Mapping[str, object]] | None = None
                 ) -> dict[str, ml_collections.ConfigDict]:
    """The demo's seven configs: tiny presets with `DEMO_CHANGES` then a recipe's `recipe_changes`, the stages of
    DATASETS on the prepared datasets `datasets` names, k-means and RVQ reading the SSL and MuLan runs under `root`,
    the LM and the DPD reading the records cached there (no held-out records: the demo evaluates the bundle, not
    these two)."""
    recipe_changes = recipe_changes or {}
    workdirs = {s: os.path.join(root, s) for s in STAGES}
    cached = {stage: {"data.source": "cached", "data.path": os.path.join(root, c.folder), "data.eval_split": ""}
              for stage, c in CACHES.items()}
    lm_tokens = {"data.semantic_len": round(CACHES["semantic_lm"].seconds * 25)}  # 25-Hz semantic tokens
    changes = {"kmeans": upstream_overrides("kmeans", workdirs), "rvq": upstream_overrides("rvq", workdirs),
               "semantic_lm": {**cached["semantic_lm"], **lm_tokens}, "dpd": cached["dpd"],
               **{stage: {"data.path": datasets[name]} for name, stages in DATASETS.items() for stage in stages}}
    configs = {}
    for stage in STAGES:
        steps = ({"train.num_steps": max(1, min(int(DEMO_STEPS[stage] * steps_scale), STEP_CAPS.get(stage, math.inf)))}
                 if stage in DEMO_STEPS else {})
        configs[stage] = stage_config(stage, "tiny", {**changes[stage], **DEMO_CHANGES.get(stage, {}),
                                                      **recipe_changes.get(stage, {}), **steps,
                                                      "train.tensorboard": False})
    return configs
