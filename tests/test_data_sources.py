"""Preparation from real files the test writes: every source, every rate/channel layout, broken files.

Good files must all arrive at 24 kHz mono with the right length, pitch, level and caption; each
broken file must be reported once with the right reason.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from data_pipeline import audio_io
from data_pipeline.builder import PrepareError, PrepareSettings, find_prepared, prepare
from data_pipeline.synthetic import clip_seed, generate_clip
from tests.helpers import run_cli

SR = 24000


def tone(sr: int, seconds: float, channels: int = 1, hz: float = 440.0, level: float = 0.5) -> np.ndarray:
    x = level * np.sin(2 * np.pi * hz * np.arange(int(round(sr * seconds))) / sr)
    if channels == 1:
        return x.astype(np.float32)
    return np.stack([x * 1.2, x * 0.8], axis=1).astype(np.float32)  # mean of the channels = x


def write(path: str, audio: np.ndarray, sr: int, subtype: str | None = None) -> str:
    sf.write(path, audio, sr, subtype=subtype)
    return path


def read_examples(out_dir: str, split: str = "train") -> dict[str, dict]:
    builder = tfds.builder_from_directory(find_prepared(out_dir))
    return {ex["source"].decode() + f"#{i}": ex for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split=split)))}


def by_source(examples: dict[str, dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for ex in examples.values():
        out.setdefault(ex["source"].decode(), []).append(ex)
    for exs in out.values():
        exs.sort(key=lambda e: e["offset_s"])
    return out


# name → (rate, seconds, channels, writer subtype); all are 440-Hz tones at level 0.5 after downmix.
GOOD = {
    "a_16k_mono.wav": (16000, 2.5, 1, "PCM_16"),
    "b_22k_stereo.flac": (22050, 3.0, 2, "PCM_16"),
    "c_44k_stereo.ogg": (44100, 2.0, 2, "VORBIS"),
    "d_48k_mono_long.wav": (48000, 7.5, 1, "PCM_24"),
    "e_44k_mono.mp3": (44100, 2.0, 1, "MPEG_LAYER_III"),
    "sub/f_48k_stereo_float.wav": (48000, 1.5, 2, "FLOAT"),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("folder"))
    os.makedirs(os.path.join(root, "sub"))
    for name, (sr, seconds, ch, subtype) in GOOD.items():
        write(os.path.join(root, name), tone(sr, seconds, ch), sr, subtype)
    with open(os.path.join(root, "a_16k_mono.txt"), "w") as f:
        f.write("  a quiet sine tone \n")
    with open(os.path.join(root, "b_22k_stereo.json"), "w") as f:
        json.dump({"caption": "a stereo tone", "tags": ["sine", "test"], "genre": "lab"}, f)
    # Broken files: name → expected reason.
    nan = tone(48000, 2.0)
    nan[5000] = np.nan
    inf = tone(22050, 2.0, 2)
    inf[100, 1] = np.inf
    write(os.path.join(root, "x_nan.wav"), nan, 48000, "FLOAT")
    write(os.path.join(root, "x_inf.wav"), inf, 22050, "FLOAT")
    write(os.path.join(root, "x_silent.flac"), np.zeros(44100, np.float32), 44100, "PCM_16")
    write(os.path.join(root, "x_short.wav"), tone(16000, 0.4), 16000, "PCM_16")
    write(os.path.join(root, "x_zero_frames.wav"), np.zeros(0, np.float32), 16000, "PCM_16")
    with open(os.path.join(root, "x_corrupt.flac"), "wb") as f:
        f.write(np.random.default_rng(0).bytes(5000))
    open(os.path.join(root, "x_empty.ogg"), "wb").close()
    with open(os.path.join(root, "x_format.m4a"), "wb") as f:
        f.write(b"\x00\x00\x00\x18ftypM4A " + bytes(200))
    with open(os.path.join(root, "x_bad_sidecar.wav"), "wb") as f:
        f.write(open(os.path.join(root, "a_16k_mono.wav"), "rb").read())
    with open(os.path.join(root, "x_bad_sidecar.json"), "w") as f:
        f.write("{not json")
    os.mkfifo(os.path.join(root, "x_fifo.wav"))  # opening a FIFO for reading would block forever
    with open(os.path.join(root, "notes.md"), "w") as f:  # not audio: ignored, not reported
        f.write("hello")
    return root


BAD = {
    "x_nan.wav": audio_io.NON_FINITE,
    "x_inf.wav": audio_io.NON_FINITE,
    "x_silent.flac": audio_io.SILENT,
    "x_short.wav": audio_io.TOO_SHORT,
    "x_zero_frames.wav": audio_io.NO_AUDIO,
    "x_corrupt.flac": audio_io.CORRUPT,
    "x_empty.ogg": audio_io.EMPTY_FILE,
    "x_format.m4a": audio_io.UNSUPPORTED,
    "x_bad_sidecar.wav": audio_io.BAD_ENTRY,
    "x_fifo.wav": audio_io.NOT_A_FILE,
}


@pytest.fixture(scope="module")
def prepared_folder(folder, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prepared"))
    settings = PrepareSettings(source="folder", input=folder, sample_rate=SR, min_seconds=1.0, segment_seconds=3.0)
    return out, prepare(settings, out, progress=False), settings


def test_folder_good_files_arrive_resampled_mono_with_captions(prepared_folder):
    out, report, _ = prepared_folder
    got = by_source(read_examples(out))
    assert sorted(got) == sorted(GOOD)
    for name, (sr, seconds, _, _) in GOOD.items():
        audio = np.concatenate([e["audio"] for e in got[name]]).astype(np.float64) / 32768.0
        assert audio.dtype == np.float64 and got[name][0]["audio"].dtype == np.int16
        assert len(audio) == round(seconds * SR), name  # exact length after resampling
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
        peak_hz = np.argmax(spectrum) * SR / len(audio)
        assert abs(peak_hz - 440.0) < 1.0, (name, peak_hz)  # pitch survives resampling
        rms = np.sqrt(np.mean(audio[SR // 10 : -SR // 10] ** 2))
        assert abs(rms - 0.5 / np.sqrt(2)) < 0.01, (name, rms)  # stereo downmixed to the mean
    info = tfds.builder_from_directory(find_prepared(out)).info
    assert info.metadata["settings"]["sample_rate"] == SR
    assert got["a_16k_mono.wav"][0]["caption"].decode() == "a quiet sine tone"
    b = got["b_22k_stereo.flac"][0]
    assert b["caption"].decode() == "a stereo tone" and [t.decode() for t in b["tags"]] == ["sine", "test"]
    assert json.loads(b["attributes"]) == {"genre": "lab"}
    assert got["c_44k_stereo.ogg"][0]["caption"].decode() == ""  # no sidecar: empty caption, kept
    assert report.items_read == len(GOOD) + len(BAD)


def test_long_file_is_cut_into_segments_with_offsets(prepared_folder):
    out, _, _ = prepared_folder
    segs = by_source(read_examples(out))["d_48k_mono_long.wav"]
    # 7.5 s with 3-s segments: 3 + 3 + 1.5 (the 1.5-s tail is >= min_seconds, so it stands alone).
    assert [len(s["audio"]) for s in segs] == [3 * SR, 3 * SR, int(1.5 * SR)]
    assert [float(s["offset_s"]) for s in segs] == [0.0, 3.0, 6.0]
    ids = sorted(int(e["id"]) for e in read_examples(out).values())
    assert ids == list(range(len(ids)))  # unique, dense example ids


def test_bad_files_reported_with_reason(prepared_folder):
    _, report, _ = prepared_folder
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert reasons == BAD
    assert report.items_skipped == len(BAD)
    assert report.skipped_by_reason()[audio_io.NON_FINITE] == 2
    assert report.examples_written == len(GOOD) + 2  # the long file gave 3 examples
    expected_s = sum(s for _, s, _, _ in GOOD.values())
    assert report.hours_prepared == pytest.approx(expected_s / 3600, rel=1e-6)
    assert report.prepared_hours_per_second > 0


def test_prepare_reuses_same_settings_and_refuses_others(prepared_folder):
    out, report, settings = prepared_folder
    again = prepare(settings, out, progress=False)
    assert again.reused and again.examples_written == report.examples_written
    with pytest.raises(PrepareError, match="other settings"):
        prepare(PrepareSettings(**{**settings.__dict__, "sample_rate": 16000}), out, progress=False)


def test_manifest_source(folder, tmp_path):
    manifest = tmp_path / "m.jsonl"
    rel = os.path.relpath(folder, tmp_path)
    lines = [
        json.dumps({"path": f"{rel}/b_22k_stereo.flac", "caption": "from manifest", "tags": "x, y", "mood": "calm"}),
        "",
        "{broken json",
        json.dumps({"path": f"{rel}/d_48k_mono_long.wav", "start_s": 1.0, "end_s": 3.5}),
        json.dumps({"path": f"{rel}/missing.wav"}),
        json.dumps({"path": f"{rel}/x_silent.flac", "caption": "silence"}),
        json.dumps({"caption": "no path"}),
    ]
    manifest.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="manifest", input=str(manifest), sample_rate=SR), out, progress=False)
    got = by_source(read_examples(out))
    assert len(got) == 2
    flac = got[f"m.jsonl:1:{rel}/b_22k_stereo.flac"][0]
    assert flac["caption"].decode() == "from manifest" and [t.decode() for t in flac["tags"]] == ["x", "y"]
    assert json.loads(flac["attributes"]) == {"mood": "calm"}
    ranged = got[f"m.jsonl:4:{rel}/d_48k_mono_long.wav"][0]
    assert len(ranged["audio"]) == round(2.5 * SR)  # [1.0, 3.5) s
    reasons = sorted((s["item"].split(":")[1], s["reason"]) for s in report.skipped)
    assert reasons == [("3", audio_io.BAD_ENTRY), ("5", audio_io.MISSING), ("6", audio_io.SILENT),
                       ("7", audio_io.BAD_ENTRY)]


def test_musiccaps_source_selects_csv_time_range(tmp_path):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    # A full 12-s "YouTube" file at 48 kHz: 440 Hz for 0-5 s, 660 Hz for 5-12 s.
    full = np.concatenate([tone(48000, 5.0), tone(48000, 7.0, hz=660.0)])
    write(str(audio_dir / "yt_full.flac"), full, 48000, "PCM_16")
    write(str(audio_dir / "yt_precut.wav"), tone(44100, 10.0, 2), 44100, "PCM_16")  # already the 10-s clip
    write(str(audio_dir / "yt_short.wav"), tone(16000, 4.0), 16000, "PCM_16")
    rows = [
        ["ytid", "start_s", "end_s", "audioset_positive_labels", "aspect_list", "caption", "author_id",
         "is_balanced_subset", "is_audioset_eval"],
        ["yt_full", "6", "10", "/m/04rlf", "['high pitch', 'sine']", "a high sine", "4", "False", "True"],
        ["yt_precut", "30", "40", "/m/04rlf", "['stereo']", "pre-cut clip", "1", "True", "False"],
        ["yt_short", "20", "30", "", "[]", "range beyond the file", "2", "False", "False"],
        ["yt_absent", "0", "10", "", "[]", "no file", "3", "False", "False"],
        ["yt_full", "x", "10", "", "[]", "bad start", "3", "False", "False"],
    ]
    csv_path = tmp_path / "musiccaps.csv"
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="musiccaps", input=str(csv_path), audio_dir=str(audio_dir),
                                     sample_rate=SR, segment_seconds=0.0), out, progress=False)
    got = by_source(read_examples(out))
    assert sorted(got) == ["yt_full@6", "yt_precut@30"]
    seg = got["yt_full@6"][0]
    assert len(seg["audio"]) == 4 * SR
    spectrum = np.abs(np.fft.rfft(seg["audio"].astype(np.float64)))
    assert abs(np.argmax(spectrum) * SR / len(seg["audio"]) - 660.0) < 1.0  # the 6-10 s range, not 0-4 s
    assert [t.decode() for t in seg["tags"]] == ["high pitch", "sine"]
    attrs = json.loads(seg["attributes"])
    assert attrs["is_audioset_eval"] == "True" and attrs["start_s"] == 6.0 and attrs["ytid"] == "yt_full"
    assert len(got["yt_precut@30"][0]["audio"]) == 10 * SR
    assert {s["item"]: s["reason"] for s in report.skipped} == {
        "yt_short@20": audio_io.BAD_RANGE, "yt_absent@0": audio_io.MISSING, "yt_full@x": audio_io.BAD_ENTRY}


def test_synthetic_source_stores_attributes_and_validation_split(tmp_path):
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="synthetic", num_clips=6, seed=3, clip_seconds=2.0, sample_rate=16000,
                                     pcm="float32", val_fraction=0.3), out, progress=False)
    train, val = read_examples(out, "train"), read_examples(out, "validation")
    assert len(train) + len(val) == 6 and len(val) >= 1 and report.examples_per_split["validation"] == len(val)
    for ex in list(train.values()) + list(val.values()):
        index = int(ex["source"].decode().rsplit("/", 1)[1])
        clip = generate_clip(clip_seed(3, index), 2.0, 16000)
        assert ex["audio"].dtype == np.float32 and len(ex["audio"]) == 32000
        np.testing.assert_allclose(ex["audio"], clip.audio, atol=1e-6)
        assert json.loads(ex["attributes"]) == json.loads(json.dumps(clip.attributes))
        assert ex["caption"].decode() == clip.caption and [t.decode() for t in ex["tags"]] == clip.tags


def test_cli_prepares_and_reports(tmp_path):
    out = str(tmp_path / "cli")
    done = run_cli("launch.prepare_data", "--source=synthetic", "--num_clips=3", "--clip_seconds=2",
                   "--sample_rate=16000", f"--out={out}", timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "examples written: 3" in done.stdout
    report = json.load(open(os.path.join(out, "prepare_report.json")))
    assert report["items_read"] == 3 and report["hours_prepared"] == pytest.approx(6 / 3600)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "only.wav").write_bytes(b"RIFF garbage")
    failed = run_cli("launch.prepare_data", "--source=folder", f"--input={bad}", f"--out={tmp_path / 'o2'}",
                     timeout=120)
    assert failed.returncode == 2
    assert "no usable examples" in failed.stderr and "only.wav" in failed.stderr


def test_segments_peak_limit_and_pcm():
    assert audio_io.split_segments(100, 30, 10) == [(0, 30), (30, 60), (60, 90), (90, 100)]
    assert audio_io.split_segments(95, 30, 10) == [(0, 30), (30, 60), (60, 95)]  # short tail joins
    assert audio_io.split_segments(95, 0, 10) == [(0, 95)]
    loud = np.array([0.5, -2.0, 1.0], np.float32)  # a float file above full scale: scaled, not clipped
    np.testing.assert_array_equal(audio_io.limit_peak(loud), [0.25, -1.0, 0.5])
    np.testing.assert_array_equal(audio_io.to_pcm(audio_io.limit_peak(loud), "int16"), [8192, -32767, 16384])
    assert audio_io.to_pcm(loud, "float32").dtype == np.float32
