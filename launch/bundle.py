"""`python -m launch.bundle --out=DIR --vae=... --ssl=... --kmeans=... --mulan=... --rvq=... --lm=... --dpd=...`.

Checks that the trained stages fit together (sample rates, latent size, vocabularies, frame rates)
and copies each one's config and newest parameters (no optimizer state) into one directory that
`launch.sample` loads. `--model=musicgen` bundles `--codec` and `--musicgen` instead (checked: codebooks,
frame rate). `--weights=ema|raw` picks a stage's EMA weights (the default, where its run kept them)
or its raw parameters; `--merge_lora` writes a LoRA-fine-tuned stage with its adapters merged.
"""
from __future__ import annotations

import json

from absl import flags

from launch.common import quiet_library_logs, run_app, run_user_errors

_OUT = flags.DEFINE_string("out", None, "Bundle directory to create.")
_MODEL = flags.DEFINE_enum("model", "melody", ["melody", "musicgen"], "Which system the bundle serves.")
FLAG_STAGES = {"vae": "vae_gan", "ssl": "ssl", "kmeans": "kmeans", "mulan": "mulan", "rvq": "rvq",
               "lm": "semantic_lm", "dpd": "dpd", "codec": "codec", "musicgen": "musicgen"}
_WEIGHTS = flags.DEFINE_enum("weights", "ema", ["ema", "raw"],
                              "ema: each stage's EMA of its parameters where its run kept one (train.ema_decay > 0); "
                              "raw: the parameters themselves.")
_MERGE_LORA = flags.DEFINE_bool("merge_lora", False, "Merge a LoRA-fine-tuned stage's adapters into plain weights "
                                "(required to bundle such a stage).")
_DIRS = {flag: flags.DEFINE_string(flag, None, f"Workdir of the {stage} stage.") for flag, stage in FLAG_STAGES.items()}
flags.mark_flags_as_required(["out"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    import jax

    from configs.melody import STAGES
    from melody_jax.pipelines.bundle import MUSICGEN_STAGES, assemble
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    stages = STAGES if _MODEL.value == "melody" else MUSICGEN_STAGES
    sources = {FLAG_STAGES[f]: d.value for f, d in _DIRS.items() if d.value and FLAG_STAGES[f] in stages}
    mesh = make_mesh({"data": 1}, jax.devices()[:1])  # copying parameters needs no sharding
    manifest = run_user_errors(lambda: assemble(_OUT.value, sources, mesh, DEFAULT_RULES, stages,
                                                       _WEIGHTS.value, _MERGE_LORA.value))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    run_app(main)
