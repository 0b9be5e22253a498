"""`python -m launch.tokenize --data=DIR --out=DIR --vae=DIR --ssl=DIR --kmeans=DIR --mulan=DIR --rvq=DIR`.

Runs the frozen VAE-GAN encoder, SSL + k-means and MuLan + RVQ once over each split of a prepared
dataset and writes, per `--crop_seconds` crop of every clip, its VAE latents, semantic tokens and
MuLan tokens as TFRecords (`data_pipeline.token_records`), one file per split in the cache folder
`--out`: the cached data of the semantic LM and DPD stages (`data.source=cached`, `data.path=` that
folder, `data.eval_split` its held-out split). The stage folders may be training workdirs or a
bundle's folders.
"""
from __future__ import annotations

from absl import flags

from configs.melody import TOKENIZE_STAGES
from launch.common import quiet_library_logs, run_app, run_user_errors

_DATA = flags.DEFINE_string("data", None, "Prepared dataset (python -m launch.prepare_data).")
_SPLITS = flags.DEFINE_list("splits", None, "Dataset splits to tokenize (default: every split it has).")
_OUT = flags.DEFINE_string("out", None, "Cache folder to write the records of each split into.")
_CROP = flags.DEFINE_float("crop_seconds", 10.0, "Crop length: the DPD's window (latent_length · hop / rate).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Crops per forward pass.")
_STAGES = {s: flags.DEFINE_string("vae" if s == "vae_gan" else s, None, f"Directory of the {s} stage.")
           for s in TOKENIZE_STAGES}
flags.mark_flags_as_required(["data", "out", *(f.name for f in _STAGES.values())])


def check_arguments() -> tuple[str, list[str]]:
    """The dataset and its splits, the crop, the batch and --out checked before any stage is loaded;
    the absolute --out and the splits."""
    import math
    import os

    import tensorflow_datasets as tfds

    from data_pipeline.builder import find_prepared
    from melody_jax.pipelines.validation import ArgumentError

    try:
        prepared = find_prepared(_DATA.value)
    except FileNotFoundError as e:
        raise ArgumentError(f"--data: {e}") from None
    have = sorted(tfds.builder_from_directory(prepared).info.splits)
    splits = _SPLITS.value or have
    missing = sorted(set(splits) - set(have))
    if missing:
        raise ArgumentError(f"--splits: {_DATA.value} has no split {missing[0]!r} (it has {have})")
    if not (math.isfinite(_CROP.value) and _CROP.value > 0):
        raise ArgumentError(f"--crop_seconds={_CROP.value} must be a positive number of seconds")
    if _BATCH.value < 1:
        raise ArgumentError(f"--batch_size={_BATCH.value} must be >= 1")
    out = os.path.abspath(_OUT.value)
    if not _OUT.value.strip() or os.path.isfile(out):
        raise ArgumentError(f"--out={_OUT.value!r} must name a cache folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ArgumentError(f"--out={_OUT.value}: cannot create the folder ({e.strerror or e})") from None
    return out, splits


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    import jax

    from data_pipeline.tokenized import tokenize_dataset
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    def run() -> None:
        out, splits = check_arguments()
        dirs = {stage: flag.value for stage, flag in _STAGES.items()}
        written = tokenize_dataset(_DATA.value, splits, out, dirs, _CROP.value, _BATCH.value,
                                   make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
        for split, arrays in written.items():
            shapes = ", ".join(f"{k} {v.shape[1:]}" for k, v in arrays.items())
            print(f"wrote {len(arrays['latents'])} {split} crops of {_CROP.value:g} s to {out}: {shapes}")

    run_user_errors(run)


if __name__ == "__main__":
    run_app(main)
