"""`python -m launch.tokenize --data=DIR --out=FILE --vae=DIR --ssl=DIR --kmeans=DIR --mulan=DIR --rvq=DIR`.

Runs the frozen VAE-GAN encoder, SSL + k-means and MuLan + RVQ once over a prepared dataset and
writes, per `--crop_seconds` crop of every clip, its VAE latents, semantic tokens and MuLan tokens
as TFRecords (`data_pipeline.token_records`): the cached data of the semantic LM and DPD
stages (`data.source=cached`). The stage folders may be training workdirs or a bundle's folders.
"""
from __future__ import annotations

from absl import flags

from configs.melody import TOKENIZE_STAGES
from launch.common import quiet_library_logs, run_app, run_user_errors

_DATA = flags.DEFINE_string("data", None, "Prepared dataset (python -m launch.prepare_data).")
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split to tokenize.")
_OUT = flags.DEFINE_string("out", None, "TFRecord file to write.")
_CROP = flags.DEFINE_float("crop_seconds", 10.0, "Crop length: the DPD's window (latent_length · hop / rate).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Crops per forward pass.")
_STAGES = {s: flags.DEFINE_string("vae" if s == "vae_gan" else s, None, f"Directory of the {s} stage.")
           for s in TOKENIZE_STAGES}
flags.mark_flags_as_required(["data", "out", *(f.name for f in _STAGES.values())])


def check_arguments() -> str:
    """The dataset, the crop, the batch and --out checked before any stage is loaded; the absolute --out."""
    import math

    from data_pipeline.builder import find_prepared
    from melody_jax.pipelines.validation import ArgumentError, check_output_path

    try:
        find_prepared(_DATA.value)
    except FileNotFoundError as e:
        raise ArgumentError(f"--data: {e}") from None
    if not (math.isfinite(_CROP.value) and _CROP.value > 0):
        raise ArgumentError(f"--crop_seconds={_CROP.value} must be a positive number of seconds")
    if _BATCH.value < 1:
        raise ArgumentError(f"--batch_size={_BATCH.value} must be >= 1")
    return check_output_path(_OUT.value, extensions=None)


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    import jax

    from data_pipeline.tokenized import tokenize_dataset
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    def run() -> None:
        out = check_arguments()
        dirs = {stage: flag.value for stage, flag in _STAGES.items()}
        arrays = tokenize_dataset(_DATA.value, _SPLIT.value, out, dirs, _CROP.value, _BATCH.value,
                                  make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
        shapes = ", ".join(f"{k} {v.shape[1:]}" for k, v in arrays.items())
        print(f"wrote {len(arrays['latents'])} crops of {_CROP.value:g} s to {_OUT.value}: {shapes}")

    run_user_errors(run)


if __name__ == "__main__":
    run_app(main)
