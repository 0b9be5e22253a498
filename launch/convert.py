"""`python -m launch.convert --format=hf --input=DIR --out=BUNDLE`: a downloaded public checkpoint → a bundle.

`--input` is a Hugging Face checkpoint directory as the user downloaded it (config.json,
model.safetensors or a sharded index); nothing is fetched. Two kinds, told apart by config.json's
`model_type`:
- MusicGen (facebook/musicgen-small, -medium, -large, -melody, -stereo-*; with tokenizer.json): the
  bundle holds the codec and musicgen stages (config + parameters, float32) and the T5 tokenizer, and
  loads with `MusicGen(bundle)` or `python -m launch.sample --bundle=BUNDLE --prompt=...`.
- HuBERT / MERT (`HubertModel`, m-a-p/MERT-v1-*): the bundle holds one frozen `ssl` stage, the
  semantic tokenizer's tower, taking `--sample_rate` audio; fit k-means on it with
  `--config.upstream.ssl=BUNDLE/ssl`.
A directory that is not such a checkpoint, a missing or misshapen tensor, or a variant we do not
compute: `error: ...`, exit 2.
"""
from __future__ import annotations

import json
import os
import shutil

from absl import flags

from launch.common import quiet_library_logs, run_app, run_user_errors

_FORMAT = flags.DEFINE_enum("format", "hf", ["hf"], "Checkpoint format: hf = Hugging Face transformers.")
_INPUT = flags.DEFINE_string("input", None,
                             "Checkpoint directory (config.json + safetensors; MusicGen: + tokenizer.json).")
_OUT = flags.DEFINE_string("out", None, "Bundle directory to create.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype stored in the bundle "
                           "(parameters stay float32): float32 for parity with transformers, bfloat16 for speed.")
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", 24000, "HuBERT/MERT: the rate of the audio the tokenizer takes "
                                   "(resampled inside to the tower's own rate); a multiple of 25.")
_SCAN = flags.DEFINE_bool("scan_layers", False, "MusicGen: write the LM's and T5's blocks stacked, for "
                          "model.scan_layers (faster compiles; the same outputs).")
flags.mark_flags_as_required(["input", "out"])


def convert(source: str, out: str, dtype: str = "float32", sample_rate: int = 24000,
            scan_layers: bool = False) -> dict:
    """Writes the bundle of the HF checkpoint in `source` to `out`; returns its manifest."""
    from melody_jax.convert.checkpoint_dir import read_checkpoint
    from melody_jax.convert.hf_hubert import MODEL_TYPES, hubert_from_hf
    from melody_jax.convert.hf_musicgen import TOKENIZER_FILE, musicgen_from_hf
    from melody_jax.frozen.codec import check_musicgen_fit
    from melody_jax.pipelines.bundle import refuse_existing, write_manifest, write_stage
    from melody_jax.training import config as config_lib

    refuse_existing(out)
    checkpoint = read_checkpoint(source)
    origin = os.path.abspath(source)
    if checkpoint.config.get("model_type") in MODEL_TYPES:
        tower = hubert_from_hf(checkpoint, sample_rate)
        tower.config.model.dtype = dtype
        write_stage(os.path.join(out, "ssl"), "ssl", config_lib.to_json(tower.config), tower.params, 0)
        return {**write_manifest(out, {"ssl": 0}, {"ssl": origin}), "variant": tower.variant}
    converted = musicgen_from_hf(checkpoint, scan_layers)
    converted.musicgen_config.model.dtype = dtype
    configs = {"codec": converted.codec_config, "musicgen": converted.musicgen_config}
    check_musicgen_fit(configs)
    params = {"codec": converted.codec_params, "musicgen": converted.musicgen_params}
    for stage in ("codec", "musicgen"):
        write_stage(os.path.join(out, stage), stage, config_lib.to_json(configs[stage]),
                    params[stage], 0)
    shutil.copy(converted.tokenizer, os.path.join(out, "musicgen", TOKENIZER_FILE))
    manifest = write_manifest(out, {"codec": 0, "musicgen": 0}, {"codec": origin, "musicgen": origin})
    return {**manifest, "variant": converted.variant}


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    manifest = run_user_errors(lambda: convert(_INPUT.value, _OUT.value, _DTYPE.value, _SAMPLE_RATE.value,
                                               _SCAN.value))
    print(json.dumps(manifest, indent=2))


if __name__ == "__main__":
    run_app(main)
