"""Issue 27, cases 3, 12, 14 and 18 (ytids): preparation never dies on one file or one row — duplicate
keys are counted skips, a bad validation pick is replaced, MusicCaps ytids stay inside --audio_dir, and
the prepare/tokenize/evaluate CLIs refuse unusable paths with one line before any work.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from data_pipeline import audio_io
from data_pipeline.builder import PrepareError, PrepareSettings, _hash_fraction, find_prepared, prepare
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # preparations and CLI runs

SR = 8000


def wav(path, seconds: float = 1.0, hz: float = 440.0) -> None:
    t = np.arange(int(SR * seconds)) / SR
    sf.write(str(path), (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32), SR)


def sources_in(out: str, split: str = "train") -> list[str]:
    builder = tfds.builder_from_directory(find_prepared(out))
    return sorted(ex["source"].decode() for ex in tfds.as_numpy(builder.as_dataset(split=split)))


def test_case3_duplicate_keys_are_counted_skips_and_the_report_is_honest(tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    wav(audio / "abc.wav", 2.0)
    wav(audio / "xyz.wav", 2.0)
    (tmp_path / "mc.csv").write_text("ytid,start_s,end_s,aspect_list,caption\n"
                                     "abc,0,1,\"['piano']\",one\nabc,0,1,\"['piano']\",the same row again\n"
                                     "xyz,0,1,[],other\n../audio/xyz,0,1,[],outside\n")
    out = str(tmp_path / "mc")
    report = prepare(PrepareSettings(source="musiccaps", input=str(tmp_path / "mc.csv"), audio_dir=str(audio),
                                     sample_rate=SR, segment_seconds=0.0), out, progress=False)
    assert sources_in(out) == ["abc@0", "xyz@0"]
    skipped = {s["item"]: s["reason"] for s in report.skipped}
    assert skipped == {"abc@0 (duplicate 1)": audio_io.DUPLICATE, "../audio/xyz@0": audio_io.BAD_ENTRY}
    saved = json.loads((tmp_path / "mc" / "prepare_report.json").read_text())
    assert saved["examples_written"] == 2 and saved["items_read"] == 4 and saved["items_skipped"] == 2

    folder = tmp_path / "folder"
    folder.mkdir()
    wav(folder / "tmp.wav")
    os.rename(folder / "tmp.wav", os.fsencode(folder) + b"/a\xff.wav")  # not UTF-8: its key escapes the byte
    wav(folder / "a\\xff.wav", hz=660.0)  # the escaped twin, literally
    wav(folder / "b.wav")
    out = str(tmp_path / "f")
    report = prepare(PrepareSettings(source="folder", input=str(folder), sample_rate=SR, segment_seconds=0.0), out,
                     progress=False)
    assert sources_in(out) == ["a\\xff.wav", "b.wav"]
    assert [(s["item"], s["reason"]) for s in report.skipped] == [("a\\xff.wav (duplicate 1)", audio_io.DUPLICATE)]


def test_case12_a_bad_validation_pick_is_replaced_not_fatal(tmp_path):
    names = [f"clip{i}.wav" for i in range(5)]
    names.sort(key=_hash_fraction)  # names[0] is the one validation pick (val_fraction below every hash)
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / names[0]).write_bytes(b"RIFF not really a wav")
    for name in names[1:]:
        wav(folder / name)
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="folder", input=str(folder), sample_rate=SR, segment_seconds=0.0,
                                     val_fraction=1e-9), out, progress=False)
    assert sources_in(out, "validation") == [names[1]]  # the next-ranked item
    assert sources_in(out, "train") == sorted(names[2:])
    assert [s["item"] for s in report.skipped] == [names[0]]
    assert report.examples_per_split == {"validation": 1, "train": 3}


def test_case14_prepare_out_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    settings = PrepareSettings(source="synthetic", num_clips=2, clip_seconds=1.0, sample_rate=SR)
    with pytest.raises(PrepareError, match=r"^--out=.*/file is a file; name a folder$"):
        prepare(settings, str(tmp_path / "file"), progress=False)
    with pytest.raises(PrepareError, match=r"^--out=/proc/melody is not a writable folder \("):
        prepare(settings, "/proc/melody", progress=False)
    leftover = tmp_path / "ok" / "prepared_audio" / "incomplete.ABC123_1.0.0"
    leftover.mkdir(parents=True)  # what a killed preparation leaves
    prepare(settings, str(tmp_path / "ok"), progress=False)
    assert not leftover.exists()


@pytest.mark.parametrize("module, args, message", [
    ("launch.tokenize", ("--data=/nonexistent", "--out=tokens"), "error: --data: no prepared dataset in "),
    ("launch.tokenize", ("--data={data}", "--crop_seconds=0", "--out=tokens"),
     "error: --crop_seconds=0.0 must be a positive number of seconds"),
    ("launch.tokenize", ("--data={data}", "--fields=semantic_tokens,chroma", "--out=tokens"),
     "error: --fields=semantic_tokens,chroma: need one or more of latents, semantic_tokens, mulan_tokens, "),
    ("launch.evaluate", ("--bundle=/nonexistent", "--reference=/nonexistent"), "error: --reference: no prepared"),
])  # --out as a folder: check_output_path (test_reliability_cli.py); prepare_data's --out: the test above
def test_case14_cli_path_mistakes_are_one_line_before_any_work(tmp_path_factory, module, args, message):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "file").write_text("x")
    data = str(tmp_path_factory.getbasetemp() / "data")
    if not os.path.exists(data):
        prepare(PrepareSettings(source="synthetic", num_clips=2, clip_seconds=1.0, sample_rate=SR), data,
                progress=False)
    stages = [f"--{s}=/nonexistent/{s}" for s in ("vae", "ssl", "kmeans", "mulan", "rvq")] if "tokenize" in module else []
    out = run_cli(module, *(a.format(data=data, tmp=tmp) for a in args), *stages, timeout=180)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr[-2000:]
    assert errors[0].startswith(message.format(tmp=tmp)), errors[0]


def test_case15_report_reasons_are_honest(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    (folder / "locked").mkdir(parents=True)
    (folder / "text.mp3").write_text("these are words, not MPEG frames\n" * 20)
    t = np.arange(SR) / SR
    audio = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    audio[3 * SR // 4] = np.nan  # 0.75 s into a 1-s float file
    sf.write(str(folder / "nan.wav"), audio, SR, subtype="FLOAT")
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (root reads every folder)
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    from data_pipeline import sources

    items = {it.key: it for it in sources.folder_items(str(folder))}
    assert items["locked/"].error == (audio_io.UNREADABLE, "folder could not be listed: Permission denied")
    with pytest.raises(audio_io.BadAudio) as e:
        audio_io.decode(str(folder / "text.mp3"), SR)
    assert e.value.reason == audio_io.CORRUPT and "pipe" not in e.value.detail
    assert e.value.detail.endswith("its contents are not .mp3 audio (a file of another kind under an audio name?)")
    with pytest.raises(audio_io.BadAudio, match=r"^NaN/Inf samples: at 0.750 s$"):
        audio_io.decode(str(folder / "nan.wav"), SR)


def test_case15_a_truncated_file_is_kept_with_a_note(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    wav(folder / "full.wav", 2.0)
    data = (folder / "full.wav").read_bytes()
    (folder / "cut.wav").write_bytes(data[: 44 + (len(data) - 44) // 2])  # half of the 16-bit samples
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="folder", input=str(folder), sample_rate=SR, segment_seconds=0.0), out,
                     progress=False)
    assert sources_in(out) == ["cut.wav", "full.wav"] and not report.skipped
    assert report.notes == [{"item": "cut.wav", "note": "truncated: its header promises 2.00 s, 1.00 s decoded and kept"}]
    assert json.loads((tmp_path / "out" / "prepare_report.json").read_text())["notes"] == report.notes
    assert "kept with a note: 1" in report.summary()
