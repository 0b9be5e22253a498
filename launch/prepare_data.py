"""`python -m launch.prepare_data --source=... --out=DIR`: prepare audio for training (DESIGN §5).

    --source=folder    --input=DIR                       audio files + optional x.txt / x.json captions
    --source=manifest  --input=FILE.jsonl                {"path", "caption", "tags", ...} per line
    --source=musiccaps --input=FILE.csv --audio_dir=DIR  MusicCaps rows over <ytid>.<ext> files
    --source=synthetic --num_clips=N --seed=S            the built-in captioned synthetic music

Writes a TFDS dataset under DIR (name it in a training config as `data.path=DIR`) and
DIR/prepare_report.json: items read, examples written, hours prepared, and every skipped file with
its reason. Bad files are skipped and counted, never fatal; the exit code is 2 only when the
arguments are wrong or nothing usable was found.
"""
from __future__ import annotations

from absl import flags

from data_pipeline.builder import REPORT_FILE, PrepareSettings, prepare
from data_pipeline.sources import SOURCES
from launch.common import run_app, run_user_errors

_defaults = PrepareSettings(source="synthetic")
_SOURCE = flags.DEFINE_enum("source", None, list(SOURCES), "Where the audio comes from.")
_INPUT = flags.DEFINE_string("input", "", "Folder (folder), JSONL file (manifest) or CSV file (musiccaps).")
_AUDIO_DIR = flags.DEFINE_string("audio_dir", "", "musiccaps: folder of <ytid>.<ext> audio files.")
_OUT = flags.DEFINE_string("out", None, "Output folder (the training config's data.path).")
_NUM_CLIPS = flags.DEFINE_integer("num_clips", 100, "synthetic: number of clips.")
_SEED = flags.DEFINE_integer("seed", _defaults.seed, "synthetic: dataset seed.")
_CLIP_SECONDS = flags.DEFINE_float("clip_seconds", _defaults.clip_seconds, "synthetic: seconds per clip.")
_SAMPLE_RATE = flags.DEFINE_integer("sample_rate", _defaults.sample_rate, "Output rate (32000 for MusicGen).")
_PCM = flags.DEFINE_enum("pcm", _defaults.pcm, ["int16", "float32"], "Stored sample format.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", _defaults.min_seconds, "Skip audio shorter than this.")
_SEGMENT_SECONDS = flags.DEFINE_float(
    "segment_seconds", _defaults.segment_seconds, "Cut longer audio into segments of at most this (0: never).")
_SILENCE_DB = flags.DEFINE_float("silence_db", _defaults.silence_db, "Skip audio whose peak is at or below this dBFS.")
_VAL_FRACTION = flags.DEFINE_float("val_fraction", _defaults.val_fraction, "Share of items in a 'validation' split.")
_WORKERS = flags.DEFINE_integer("workers", _defaults.workers, "Decoding threads.")
_BLOCK_SECONDS = flags.DEFINE_float("block_seconds", _defaults.block_seconds,
                                    "Seconds of a source file decoded per read (bounds memory; the data is the same).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace a dataset prepared in --out with other settings.")
flags.mark_flags_as_required(["source", "out"])
_MAX_LISTED = 50


def main(argv: list[str]) -> None:
    del argv
    settings = PrepareSettings(
        source=_SOURCE.value, input=_INPUT.value, audio_dir=_AUDIO_DIR.value,
        num_clips=_NUM_CLIPS.value if _SOURCE.value == "synthetic" else 0, seed=_SEED.value,
        clip_seconds=_CLIP_SECONDS.value, sample_rate=_SAMPLE_RATE.value, pcm=_PCM.value,
        min_seconds=_MIN_SECONDS.value, segment_seconds=_SEGMENT_SECONDS.value, silence_db=_SILENCE_DB.value,
        val_fraction=_VAL_FRACTION.value, workers=_WORKERS.value, block_seconds=_BLOCK_SECONDS.value,
    )
    report = run_user_errors(lambda: prepare(settings, _OUT.value, overwrite=_OVERWRITE.value))
    print(report.summary())
    for skip in report.skipped[:_MAX_LISTED]:
        where = skip["item"] if skip["segment"] is None else f"{skip['item']} (segment {skip['segment']})"
        print(f"  skipped {where}: {skip['reason']}" + (f" ({skip['detail']})" if skip["detail"] else ""))
    if len(report.skipped) > _MAX_LISTED:
        print(f"  ... and {len(report.skipped) - _MAX_LISTED} more")
    print(f"report (every skip): {_OUT.value}/{REPORT_FILE}")


if __name__ == "__main__":
    run_app(main)
