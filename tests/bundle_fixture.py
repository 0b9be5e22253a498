"""Tiny untrained MeLoDy and MusicGen bundles whose stages fit together (`benchmarks.untrained`).

What the pipeline tests check (lengths, kept latents, determinism, errors) does not depend on
trained weights.
"""
from __future__ import annotations

from benchmarks.untrained import untrained_bundle
from melody_jax.pipelines.bundle import MELODY_STAGES, MUSICGEN_STAGES
from melody_jax.training import config as config_lib
from tests.helpers import stage_config

VOCAB, MULAN_CODES = 32, 16


def tiny_configs(**changes) -> dict:
    """Tiny configs of the seven stages, made to agree (vocabularies, codebooks, frame rates)."""
    configs = {
        "vae_gan": stage_config("vae_gan"),
        "ssl": stage_config("ssl"),
        "kmeans": stage_config("kmeans", model__num_clusters=VOCAB),
        "mulan": stage_config("mulan", data__sample_rate=24000),
        "rvq": stage_config("rvq", model__codebook_size=MULAN_CODES),
        "semantic_lm": stage_config("semantic_lm", model__semantic_vocab_size=VOCAB,
                                    model__mulan_codebook_size=MULAN_CODES, data__semantic_len=16),
        "dpd": stage_config("dpd", model__vocab_size=VOCAB),
    }
    configs["kmeans"].model.embed_dim = configs["ssl"].model.embed_dim
    for stage, fields in changes.items():
        for key, value in fields.items():
            configs[stage] = config_lib.apply_overrides(configs[stage], {key: str(value)})
    return configs


def build_bundle(root: str, configs: dict | None = None) -> str:
    return untrained_bundle(root, configs or tiny_configs(), MELODY_STAGES)


def build_musicgen_bundle(root: str, **musicgen_fields) -> str:
    """An untrained tiny codec + MusicGen LM bundle (codebooks, sizes and frame rate agree)."""
    configs = {"codec": stage_config("codec", data__path="x"), "musicgen": stage_config("musicgen", **musicgen_fields)}
    return untrained_bundle(root, configs, MUSICGEN_STAGES, "musicgen_bundle")
