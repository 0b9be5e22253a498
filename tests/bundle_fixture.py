"""A MeLoDy bundle of untrained tiny stages that fit together, built without training.

Each stage's workdir gets its config.json and a step-0 checkpoint of its initial state, exactly as
`launch.train` lays them out, so bundling and sampling run their real code paths on real files in
seconds. What the pipeline tests check (lengths, kept latents, determinism, errors) does not depend
on trained weights.
"""
from __future__ import annotations

import os

import jax
from flax import linen as nn

from melody_jax.pipelines.bundle import MELODY_STAGES, assemble
from melody_jax.training import config as config_lib
from melody_jax.training.checkpoint import Checkpointer, param_signature
from melody_jax.training.sharding import DEFAULT_RULES, make_mesh
from melody_jax.training.task import get_task
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


def init_workdir(config, workdir: str) -> None:
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


def build_bundle(root: str, configs: dict | None = None) -> str:
    configs = configs or tiny_configs()
    for stage in MELODY_STAGES:
        init_workdir(configs[stage], os.path.join(root, stage))
    out = os.path.join(root, "bundle")
    assemble(out, {s: os.path.join(root, s) for s in MELODY_STAGES}, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    return out
