"""Tiny untrained MeLoDy and MusicGen bundles whose stages fit together (`benchmarks.untrained`).

What the pipeline tests check (lengths, kept latents, determinism, errors) does not depend on
trained weights.
"""
from __future__ import annotations

from benchmarks.untrained import untrained_bundle
from configs import common
from configs.melody import STAGES
from melody_jax.pipelines.bundle import MUSICGEN_STAGES
from tests.helpers import QUIET, stage_config


def tiny_configs(**changes) -> dict:
    """The tiny configs of the seven stages (they compose as they are), with {stage: {"a.b": value}} changes."""
    return {stage: common.stage_config(stage, "tiny", {**QUIET, **changes.get(stage, {})}) for stage in STAGES}


def build_bundle(root: str, configs: dict | None = None) -> str:
    return untrained_bundle(root, configs or tiny_configs(), STAGES)


def build_musicgen_bundle(root: str, musicgen_fields=None) -> str:
    """An untrained tiny codec + MusicGen LM bundle (codebooks, sizes and frame rate agree)."""
    configs = {"codec": stage_config("codec", {"data.path": "x"}), "musicgen": stage_config("musicgen", musicgen_fields)}
    return untrained_bundle(root, configs, MUSICGEN_STAGES, "musicgen_bundle")
