"""Bundles: one directory with every stage a sampler needs, checked to fit together.

Layout: `BUNDLE/bundle.json` (stages, source workdirs, steps) and `BUNDLE/<stage>/` laid out like a
training workdir — `config.json` and `checkpoints/<step>/` — but holding the parameters only, so
`frozen.loader.load_stage` reads a bundle's stage and a workdir alike and a bundle is a fraction
of the size of the runs it came from.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from melody_jax.frozen.codec import MUSICGEN_STAGES, check_musicgen_fit
from melody_jax.frozen.loader import KEEP, load_stage, read_stage_config
from melody_jax.frozen.stage_models import ssl_tower
from melody_jax.training import config as config_lib
from melody_jax.training import lora
from melody_jax.training.checkpoint import Checkpointer, param_signature
from melody_jax.training.errors import BundleError, WorkdirError
from melody_jax.training.metrics import write_json_atomic

MELODY_STAGES = ("vae_gan", "ssl", "kmeans", "mulan", "rvq", "semantic_lm", "dpd")
MANIFEST = "bundle.json"


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise BundleError(message)


def check_fit(configs: Mapping[str, ml_collections.ConfigDict]) -> None:
    """One clear error for the first way MeLoDy's stages do not fit together."""
    missing = [s for s in MELODY_STAGES if s not in configs]
    _need(not missing, f"bundle lacks the stage(s) {', '.join(missing)}")
    vae, ssl, km, mulan, rvq, lm, dpd = (configs[s] for s in MELODY_STAGES)
    rate = vae.data.sample_rate
    for name in ("ssl", "mulan"):
        other = configs[name].data.sample_rate
        _need(other == rate, f"{name} works at {other} Hz but vae_gan at {rate} Hz")
    _need(vae.model.latent_dim == dpd.model.latent_dim,
          f"vae_gan latents have {vae.model.latent_dim} channels, dpd expects {dpd.model.latent_dim}")
    _need(km.model.num_clusters == lm.model.semantic_vocab_size == dpd.model.vocab_size,
          f"k-means has {km.model.num_clusters} clusters, semantic_lm a vocabulary of "
          f"{lm.model.semantic_vocab_size} and dpd of {dpd.model.vocab_size}; all three must agree")
    _need(rvq.model.num_quantizers == lm.model.num_mulan_tokens,
          f"rvq has {rvq.model.num_quantizers} levels, semantic_lm expects {lm.model.num_mulan_tokens} MuLan tokens")
    _need(rvq.model.codebook_size == lm.model.mulan_codebook_size,
          f"rvq codebooks have {rvq.model.codebook_size} codes, semantic_lm expects {lm.model.mulan_codebook_size}")
    _need(rvq.model.embed_dim == mulan.model.out_dim,
          f"rvq quantizes {rvq.model.embed_dim}-d embeddings, mulan embeds to {mulan.model.out_dim}")
    latent_rate = rate / math.prod(vae.model.encoder.rates)
    token_rate = rate / ssl_tower(ssl).hop
    frames = latent_rate / token_rate
    _need(frames == round(frames), f"vae_gan latents ({latent_rate:g} Hz) are not a whole multiple of "
                                   f"the semantic tokens ({token_rate:g} Hz)")
    window = dpd.data.latent_length / dpd.data.token_length
    _need(window == frames, f"dpd was trained with {window:g} latent frames per token, the vae_gan and ssl "
                            f"give {frames:g}")


def bundle_kind(bundle: str) -> str:
    """'melody' or 'musicgen', from the stages a bundle's manifest lists (reads no config, loads nothing)."""
    path = os.path.join(bundle, MANIFEST)
    try:
        with open(path) as f:
            stages = tuple(json.load(f)["stages"])
    except FileNotFoundError:
        raise BundleError(f"{bundle} is not a bundle (no {MANIFEST}); make one with `python -m launch.bundle`") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{path} is damaged: {e}") from None
    for kind, expected in (("melody", MELODY_STAGES), ("musicgen", MUSICGEN_STAGES)):
        if set(stages) == set(expected):
            return kind
    raise BundleError(f"{bundle} holds stages {list(stages)}: neither a MeLoDy nor a MusicGen bundle")


def read_configs(directory: str) -> dict[str, ml_collections.ConfigDict]:
    """{stage: config} of a bundle, with a clear error when it is not one."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        raise BundleError(f"{directory} is not a bundle (no {MANIFEST}); make one with `python -m launch.bundle`")
    with open(path) as f:
        try:
            stages = json.load(f)["stages"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BundleError(f"{path} is damaged: {e}") from None
    configs = {}
    for stage in stages:
        try:
            configs[stage] = read_stage_config(os.path.join(directory, stage), stage, f"bundle stage {stage}")
        except WorkdirError as e:
            raise BundleError(str(e)) from None
    return configs


def write_stage(out: str, stage: str, config_json: str, params: Any, step: int) -> None:
    """Writes one bundle stage: `config.json` and the parameters (only) at `step`."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as g:
        g.write(config_json)
    ckpt = Checkpointer(out, keep=1, every=1)
    try:
        ckpt.save(step, {"params": params}, {}, {"stage": stage, "param_signature": param_signature(params)},
                  force=True)
        ckpt.wait()
    finally:
        ckpt.close()


def export_stage(source: str, stage: str, out: str, mesh: jax.sharding.Mesh, rules, weights: str = "ema",
                 merge_lora: bool = False) -> int:
    """Copies a stage's config and newest parameters (only) from a workdir into `out`; returns the step.

    `weights="ema"` exports the run's EMA of the parameters where it kept one, `"raw"` the parameters.
    A stage fine-tuned with LoRA is exported with its adapters merged into plain weights, and only
    when `merge_lora` says so."""
    config = read_stage_config(source, stage, f"--{stage}")
    _need(merge_lora or not lora.rank(config),
          f"--{stage}={source} was fine-tuned with LoRA adapters; pass --merge_lora to export merged weights")
    loaded = load_stage(source, stage, mesh, rules, field=f"--{stage}", keep=KEEP.get(stage), weights=weights)
    if lora.rank(config):
        config.model.lora.rank = 0  # the exported weights are plain
    write_stage(out, stage, config_lib.to_json(config), loaded.params, loaded.step)
    return loaded.step


def write_manifest(out: str, steps: Mapping[str, int], sources: Mapping[str, str]) -> dict[str, Any]:
    manifest = {"stages": list(steps), "steps": dict(steps), "sources": dict(sources)}
    write_json_atomic(os.path.join(out, MANIFEST), manifest, sort_keys=False)
    return manifest


def refuse_existing(out: str) -> None:
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise BundleError(f"{out} already holds a bundle; choose another --out or remove it")


def assemble(out: str, sources: Mapping[str, str], mesh: jax.sharding.Mesh, rules,
             stages: tuple[str, ...] = MELODY_STAGES, weights: str = "ema", merge_lora: bool = False) -> dict[str, Any]:
    """Checks the workdirs fit together, then writes the bundle; returns its manifest. A failure part-way
    removes the stage folders it wrote (and `out`, if it made it), so the same command can run again."""
    missing = [s for s in stages if not sources.get(s)]
    _need(not missing, f"bundle needs a workdir for: {', '.join(missing)}")
    try:
        configs = {s: read_stage_config(sources[s], s, f"--{s}") for s in stages}
    except WorkdirError as e:
        raise BundleError(str(e)) from None
    if stages == MELODY_STAGES:
        check_fit(configs)
    elif stages == MUSICGEN_STAGES:
        check_musicgen_fit(configs)
    refuse_existing(out)
    steps, created = {}, not os.path.exists(out)
    try:
        for s in stages:
            # a stage folder without a manifest is a failed earlier run's: export it again
            shutil.rmtree(os.path.join(out, s), ignore_errors=True)
            try:
                steps[s] = export_stage(sources[s], s, os.path.join(out, s), mesh, rules, weights, merge_lora)
            except WorkdirError as e:
                raise BundleError(str(e)) from None
    except BaseException:  # a half-written bundle is never left behind
        for s in stages:
            shutil.rmtree(os.path.join(out, s), ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return write_manifest(out, steps, {s: os.path.abspath(sources[s]) for s in stages})
