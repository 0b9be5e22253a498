"""`python -m launch.tokenize --data=DIR --out=DIR --vae=DIR --ssl=DIR --kmeans=DIR --mulan=DIR --rvq=DIR`.

Runs the frozen VAE-GAN encoder, SSL + k-means and MuLan + RVQ once over each split of a prepared
dataset and writes, per crop of every clip (`--crops`: fixed, sliding or random), its VAE latents,
semantic tokens and MuLan tokens as TFRecord shards under the cache folder `--out`, listed in its
`manifest.json` (data_pipeline/tokenized.py): the cached data of the semantic LM and DPD stages
(`data.source=cached`, `data.path=` that folder, `data.eval_split` its held-out split). The stage
folders may be training workdirs or a bundle's folders.

Multi-host like `launch.train`: the same command on every host (SLURM and multi-host Cloud TPU are
detected, else `--coordinator --num_processes --process_id`); each host reads its share of the
dataset and writes its own shards, the stages run on every device. The same command resumes a
killed job (`--out` must then be the same folder and the settings the same).
"""
from __future__ import annotations

from absl import flags

from configs.melody import TOKENIZE_STAGES
from launch.common import DistributedFlags, quiet_library_logs, run_app, run_user_errors

_DATA = flags.DEFINE_string("data", None, "Prepared dataset (python -m launch.prepare_data).")
_SPLITS = flags.DEFINE_list("splits", None, "Dataset splits to tokenize (default: every split it has).")
_OUT = flags.DEFINE_string("out", None, "Cache folder: each split's shards and manifest.json.")
_CROP = flags.DEFINE_float("crop_seconds", 10.0, "Crop length: the DPD's window (latent_length · hop / rate).")
_CROPS = flags.DEFINE_enum("crops", "fixed", ["fixed", "sliding", "random"], "Crops of each clip: whole "
                           "non-overlapping ones, one every --crop_hop_seconds, or --crops_per_clip random ones.")
_HOP = flags.DEFINE_float("crop_hop_seconds", 5.0, "--crops=sliding: seconds between crop starts (< crop: overlap).")
_PER_CLIP = flags.DEFINE_integer("crops_per_clip", 4, "--crops=random: crops drawn per clip.")
_SEED = flags.DEFINE_integer("seed", 0, "--crops=random: seed of the draws (with the split and clip id).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Crops per forward pass over all devices (a multiple of them).")
_FIELDS = flags.DEFINE_list("fields", "latents,semantic_tokens,mulan_tokens,mulan_text_tokens",
                            "Model fields each record holds: the DPD reads latents and semantic_tokens, the semantic "
                            "LM semantic_tokens, mulan_tokens and (for data.text_token_share) mulan_text_tokens.")
_SHARD_MB = flags.DEFINE_float("shard_mb", 256.0, "Size of each host's shard files; a kill loses one at most.")
_STAGES = {s: flags.DEFINE_string("vae" if s == "vae_gan" else s, None, f"Directory of the {s} stage.")
           for s in TOKENIZE_STAGES}
_DISTRIBUTED = DistributedFlags()
flags.mark_flags_as_required(["data", "out", *(f.name for f in _STAGES.values())])


def check_arguments() -> tuple[str, list[str]]:
    """The dataset and its splits, the crops, the batch and --out checked before any stage is loaded;
    the absolute --out and the splits."""
    import os

    import tensorflow_datasets as tfds

    from data_pipeline.builder import find_prepared
    from data_pipeline.tokenized import checked_fields
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
    crop_spec().check()
    if _BATCH.value < 1:
        raise ArgumentError(f"--batch_size={_BATCH.value} must be >= 1")
    checked_fields(_FIELDS.value)
    if not _SHARD_MB.value > 0:
        raise ArgumentError(f"--shard_mb={_SHARD_MB.value} must be > 0")
    out = os.path.abspath(_OUT.value)
    if not _OUT.value.strip() or os.path.isfile(out):
        raise ArgumentError(f"--out={_OUT.value!r} must name a cache folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ArgumentError(f"--out={_OUT.value}: cannot create the folder ({e.strerror or e})") from None
    return out, splits


def crop_spec():  # -> data_pipeline.tokenized.CropSpec
    from data_pipeline.tokenized import CropSpec

    return CropSpec(_CROP.value, _CROPS.value, _HOP.value, _PER_CLIP.value, _SEED.value)


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    _DISTRIBUTED.join()
    import time

    import jax

    from data_pipeline.tokenized import FrozenStages, tokenize_dataset
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    def run() -> None:
        out, splits = check_arguments()
        dirs = {stage: flag.value for stage, flag in _STAGES.items()}
        stages = FrozenStages(dirs, make_mesh({"data": -1}), DEFAULT_RULES)
        start = time.perf_counter()
        written = tokenize_dataset(_DATA.value, splits, out, stages, crop_spec(), _BATCH.value,
                                   shard_mb=_SHARD_MB.value, fields=tuple(_FIELDS.value))
        seconds = time.perf_counter() - start
        if jax.process_index() == 0:
            for split, entry in written.items():
                shapes = ", ".join(f"{k} {tuple(v)}" for k, v in entry["fields"].items())
                print(f"{split}: {entry['records']} crops of {_CROP.value:g} s in {len(entry['shards'])} shards "
                      f"({shapes}) in {out}")
            print(f"{sum(e['records'] for e in written.values())} crops in {seconds:.1f} s on "
                  f"{jax.device_count()} devices, {jax.process_count()} processes")

    run_user_errors(run)


if __name__ == "__main__":
    run_app(main)
