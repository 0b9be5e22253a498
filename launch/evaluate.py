"""`python -m launch.evaluate --bundle=DIR --prompts=synthetic:32 --reference=DATA [--out=eval.json]`

Generates one clip per prompt with the bundle — MeLoDy or MusicGen, by its stages — and scores it
against a prepared reference dataset (`launch.prepare_data`, at the bundle's rate): FAD on musicnn
embeddings, FAD on MuLan embeddings and MuLan cycle consistency (MeLoDy: its own MuLan; n/a for
MusicGen), and on synthetic prompts the tempo / key / drums / instrument accuracy (see
`melody_jax.evaluation.generation`). Sampling flags left out take the bundle's `config.sample`.
Prints a Markdown table and writes the figures as JSON.
"""
from __future__ import annotations

import os

from absl import flags

from launch.common import quiet_library_logs, run_app, run_user_errors
from melody_jax.training.metrics import write_json_atomic

_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle directory (python -m launch.bundle).")
_PROMPTS = flags.DEFINE_string("prompts", "synthetic:16", "synthetic:N[:SEED], a .jsonl or a .txt file.")
_REFERENCE = flags.DEFINE_string("reference", None, "Prepared dataset (launch.prepare_data --out).")
_SPLIT = flags.DEFINE_string("split", "validation", "Reference split.")
_NUM_REFERENCE = flags.DEFINE_integer("num_reference", 64, "At most this many reference clips.")
_DURATION = flags.DEFINE_float("duration", None, "Seconds generated per prompt (default: the bundle's).")
_STEPS = flags.DEFINE_integer("steps", None, "MeLoDy: diffusion sampling steps (default: the bundle's).")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the bundle's).")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt i uses seed + i.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Prompts generated together.")
_OUT = flags.DEFINE_string("out", "eval.json", "Where the JSON report goes (a .md table beside it).")
flags.mark_flags_as_required(["bundle", "reference"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()

    def go() -> None:
        from data_pipeline.builder import find_prepared
        from melody_jax.pipelines.validation import ArgumentError, check_output_path

        try:  # before the bundle is loaded and anything generated
            find_prepared(_REFERENCE.value)
        except FileNotFoundError as e:
            raise ArgumentError(f"--reference: {e}") from None
        check_output_path(_OUT.value, extensions=None)
        from data_pipeline.builder import read_clips
        from melody_jax.evaluation.generation import evaluate, markdown, read_prompts
        from melody_jax.pipelines.load import load_pipeline

        prompts = read_prompts(_PROMPTS.value)
        pipeline = load_pipeline(_BUNDLE.value, progress=False)
        reference = read_clips(_REFERENCE.value, _SPLIT.value, pipeline.sample_rate, limit=_NUM_REFERENCE.value)
        report = evaluate(pipeline, prompts, reference, _DURATION.value, _SEED.value, _BATCH.value,
                          steps=_STEPS.value, cfg=_CFG.value)
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        write_json_atomic(_OUT.value, report, sort_keys=False)
        table = markdown(report)
        with open(os.path.splitext(_OUT.value)[0] + ".md", "w") as f:
            f.write(table)
        print(table)
        print("wrote", _OUT.value)

    run_user_errors(go)


if __name__ == "__main__":
    run_app(main)
