"""`python -m launch.tokenize --data=DIR --out=FILE --vae=DIR --ssl=DIR --kmeans=DIR --mulan=DIR --rvq=DIR`.

Runs the frozen VAE-GAN encoder, SSL + k-means and MuLan + RVQ once over a prepared dataset and
writes, per `--crop_seconds` crop of every clip, its VAE latents, semantic tokens and MuLan tokens
as TFRecords (`melody_jax.tokenizers.token_records`): the cached data of the semantic LM and DPD
stages (`data.source=cached`). The stage folders may be training workdirs or a bundle's folders.
"""
from __future__ import annotations

import os

from absl import app, flags

from launch.common import quiet_library_logs, run_user_errors

_DATA = flags.DEFINE_string("data", None, "Prepared dataset (python -m launch.prepare_data).")
_SPLIT = flags.DEFINE_string("split", "train", "Dataset split to tokenize.")
_OUT = flags.DEFINE_string("out", None, "TFRecord file to write.")
_CROP = flags.DEFINE_float("crop_seconds", 10.0, "Crop length: the DPD's window (latent_length · hop / rate).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Crops per forward pass.")
_STAGES = {s: flags.DEFINE_string(s, None, f"Directory of the {s} stage.")
           for s in ("vae", "ssl", "kmeans", "mulan", "rvq")}
flags.mark_flags_as_required(["data", "out", *_STAGES])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    import jax
    import ml_collections

    from melody_jax.pipelines.stages import load_mulan, load_tokenizer, load_vae, tokenize_clips
    from melody_jax.tasks.rvq import read_clips
    from melody_jax.tokenizers.token_records import write_records
    from melody_jax.training.errors import ConfigError
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    def run() -> None:
        mesh = make_mesh({"data": 1}, jax.devices()[:1])
        d = {k: v.value for k, v in _STAGES.items()}
        vae = load_vae(d["vae"], mesh, DEFAULT_RULES, field="--vae")
        tokenizer = load_tokenizer(d["ssl"], d["kmeans"], mesh, DEFAULT_RULES)
        mulan = load_mulan(d["mulan"], d["rvq"], mesh, DEFAULT_RULES)
        if tokenizer.sample_rate != vae.sample_rate:
            raise ConfigError(f"--ssl works at {tokenizer.sample_rate} Hz, --vae at {vae.sample_rate} Hz")
        crop = int(round(_CROP.value * vae.sample_rate))
        if crop % tokenizer.hop or crop % vae.hop:
            raise ConfigError(f"--crop_seconds={_CROP.value}: {crop} samples is not a whole number of semantic "
                              f"tokens ({tokenizer.hop} samples) and latent frames ({vae.hop} samples)")
        clips = [x["audio"] for x in read_clips(ml_collections.ConfigDict(
            {"path": _DATA.value, "sample_rate": vae.sample_rate}), _SPLIT.value)]
        arrays = tokenize_clips(clips, vae, tokenizer, mulan, crop, _BATCH.value)
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        n = write_records(_OUT.value, arrays)
        shapes = ", ".join(f"{k} {v.shape[1:]}" for k, v in arrays.items())
        print(f"wrote {n} crops of {_CROP.value:g} s from {len(clips)} clips to {_OUT.value}: {shapes}")

    run_user_errors(run)


if __name__ == "__main__":
    app.run(main)
