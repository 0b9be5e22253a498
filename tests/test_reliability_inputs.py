"""Hostile data for preparation: each file or entry is either decoded correctly or skipped and counted
with its reason; the only fatal case (a CSV that is not MusicCaps) is one line. Never a crash.

test_data_sources.py covers NaN/Inf samples, silence, corrupt FLAC, empty OGG, m4a, FIFOs, broken JSON
lines and missing files; these cover the rest of issue 12's list.
"""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import soundfile as sf
import tensorflow_datasets as tfds

from data_pipeline import audio_io, sources
from data_pipeline.builder import PrepareError, PrepareSettings, find_prepared, prepare
from tests.helpers import run_cli

SR = 24000


def tone(sr: int, seconds: float, channels: int = 1, level: float = 0.5, hz: float = 440.0) -> np.ndarray:
    x = level * np.sin(2 * np.pi * hz * np.arange(int(round(sr * seconds))) / sr)
    return np.repeat(x[:, None], channels, axis=1).astype(np.float32) if channels > 1 else x.astype(np.float32)


def examples(out_dir: str) -> dict[str, dict]:
    builder = tfds.builder_from_directory(find_prepared(out_dir))
    return {ex["source"].decode(): ex for ex in tfds.as_numpy(builder.as_dataset(split="train"))}


def peak_hz(audio: np.ndarray) -> float:
    x = audio.astype(np.float64)
    return float(np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * SR / len(x))


def truncated(path: str, fraction: float) -> bytes:
    data = open(path, "rb").read()
    return data[: int(len(data) * fraction)]


# name → (rate, seconds, channels, level, writer format/subtype) of good-but-unusual files.
ODD_GOOD = {
    "k8.wav": (8000, 2.0, 1, 0.5, ("WAV", "PCM_16")),
    "k192.wav": (192000, 1.5, 1, 0.5, ("WAV", "PCM_24")),
    "ch8.flac": (44100, 2.0, 8, 0.5, ("FLAC", "PCM_16")),
    "loud_1e6.wav": (48000, 2.0, 2, 1e6, ("WAV", "FLOAT")),  # finite but far past full scale: scaled to 1
    "really_wav.flac": (22050, 2.0, 1, 0.5, ("WAV", "PCM_16")),  # wrong extension: decoded by content
    "really_flac.ogg": (24000, 2.0, 1, 0.5, ("FLAC", "PCM_16")),
}


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("hostile"))
    for name, (sr, seconds, ch, level, (fmt, subtype)) in ODD_GOOD.items():
        sf.write(os.path.join(root, name), tone(sr, seconds, ch, level), sr, format=fmt, subtype=subtype)
    # A non-UTF-8 file name (bytes a Latin-1 system writes): decoded; its key escapes the bad byte.
    sf.write(os.path.join(os.fsencode(root), b"caf\xe9.wav"), tone(16000, 2.0), 16000)
    full, intact = {}, str(tmp_path_factory.mktemp("intact"))
    for name, fmt, subtype in [("t.wav", "WAV", "PCM_16"), ("t.flac", "FLAC", "PCM_16"),
                               ("t.ogg", "OGG", "VORBIS"), ("t.mp3", "MP3", "MPEG_LAYER_III")]:
        path = os.path.join(intact, name)
        sf.write(path, tone(SR, 3.0), SR, format=fmt, subtype=subtype)
        full[name] = path
    with open(os.path.join(root, "trunc_half.wav"), "wb") as f:  # header promises 3 s, 1.5 s present
        f.write(truncated(full["t.wav"], 0.5))
    with open(os.path.join(root, "trunc_half.flac"), "wb") as f:
        f.write(truncated(full["t.flac"], 0.5))
    with open(os.path.join(root, "trunc_head.ogg"), "wb") as f:
        f.write(truncated(full["t.ogg"], 0.02))
    with open(os.path.join(root, "trunc_head.mp3"), "wb") as f:
        f.write(truncated(full["t.mp3"], 0.02))
    with open(os.path.join(root, "trunc_header.wav"), "wb") as f:
        f.write(truncated(full["t.wav"], 1.0)[:30])  # cut inside the 44-byte header
    open(os.path.join(root, "zero_bytes.wav"), "wb").close()
    with open(os.path.join(root, "text.mp3"), "w") as f:
        f.write("this is a text file with an audio extension\n" * 20)
    sf.write(os.path.join(root, "one_sample.wav"), np.array([0.5], np.float32), 24000)
    sf.write(os.path.join(root, "max_float.wav"), tone(48000, 2.0, 1, 3.0e38), 48000, subtype="FLOAT")
    sf.write(os.path.join(root, "nan.wav"), np.full(24000, np.nan, np.float32), 24000, subtype="FLOAT")
    sf.write(os.path.join(root, "latin1_caption.wav"), tone(SR, 2.0), SR)
    with open(os.path.join(root, "latin1_caption.txt"), "wb") as f:
        f.write("caf\xe9 piano".encode("latin-1"))
    sf.write(os.path.join(root, "surrogate_caption.wav"), tone(SR, 2.0), SR)
    with open(os.path.join(root, "surrogate_caption.json"), "w") as f:
        f.write('{"caption": "piano \\ud800"}')
    sf.write(os.path.join(root, "deep_sidecar.wav"), tone(SR, 2.0), SR)
    with open(os.path.join(root, "deep_sidecar.json"), "w") as f:
        f.write("[" * 100_000 + "]" * 100_000)
    out = str(tmp_path_factory.mktemp("hostile_out"))
    report = prepare(PrepareSettings(source="folder", input=root, sample_rate=SR, segment_seconds=0.0), out,
                     progress=False)
    return out, report


HOSTILE_SKIPS = {
    "trunc_head.ogg": {audio_io.CORRUPT},
    "trunc_head.mp3": {audio_io.CORRUPT},
    "trunc_header.wav": {audio_io.CORRUPT},
    "zero_bytes.wav": {audio_io.EMPTY_FILE},
    "text.mp3": {audio_io.CORRUPT},
    "one_sample.wav": {audio_io.TOO_SHORT},
    "max_float.wav": {audio_io.OUT_OF_RANGE},
    "nan.wav": {audio_io.NON_FINITE},
    "latin1_caption.wav": {audio_io.BAD_ENTRY},
    "surrogate_caption.wav": {audio_io.BAD_ENTRY},
    "deep_sidecar.wav": {audio_io.BAD_ENTRY},
}


def test_odd_but_valid_audio_arrives_at_24k_mono(hostile_folder):
    out, _ = hostile_folder
    got = examples(out)
    assert sorted(got) == sorted([*ODD_GOOD, "caf\\xe9.wav", "trunc_half.wav", "trunc_half.flac"])
    for name, (sr, seconds, _, _, _) in ODD_GOOD.items():
        audio = got[name]["audio"].astype(np.float64) / 32767.0
        assert len(audio) == round(seconds * SR), name
        assert abs(peak_hz(audio) - 440.0) < 1.0, name
        level = 1.0 if name == "loud_1e6.wav" else 0.5  # the 1e6 file is scaled to full scale, not clipped
        assert abs(np.max(np.abs(audio)) - level) < 0.01, (name, np.max(np.abs(audio)))
    assert len(got["caf\\xe9.wav"]["audio"]) == 2 * SR
    # A WAV cut in half keeps the frames that are there, not the 3 s its header announced:
    # (half of 44 header bytes + 3 s of 16-bit samples, minus the header) / 2 bytes per sample.
    assert len(got["trunc_half.wav"]["audio"]) == ((44 + 2 * 3 * SR) // 2 - 44) // 2
    # A FLAC cut at half its bytes (near 1.5 s) keeps what decodes before the decoder loses sync (issue 27).
    assert 1.0 * SR < len(got["trunc_half.flac"]["audio"]) < 1.5 * SR


def test_hostile_files_are_skipped_with_their_reason(hostile_folder):
    _, report = hostile_folder
    reasons = {s["item"]: s["reason"] for s in report.skipped}
    assert sorted(reasons) == sorted(HOSTILE_SKIPS)
    for name, allowed in HOSTILE_SKIPS.items():
        assert reasons[name] in allowed, (name, reasons[name])
    details = {s["item"]: s["detail"] for s in report.skipped}
    assert "not valid UTF-8" in details["surrogate_caption.wav"]
    assert all("\n" not in d for d in details.values())
    assert report.items_read == len(ODD_GOOD) + 3 + len(HOSTILE_SKIPS)
    assert sorted(n["item"] for n in report.notes) == ["trunc_half.flac", "trunc_half.wav"]


def test_hostile_manifest_lines_are_counted_skips(tmp_path):
    sf.write(str(tmp_path / "good.wav"), tone(SR, 2.0), SR)
    long_ok = "a slow piano piece " * 500  # 9,500 characters: long, but within the limit
    lines = [
        json.dumps({"path": "good.wav", "caption": long_ok}).encode(),
        b'{"path": "good.wav", "caption": "caf\xe9 piano"}',  # Latin-1 bytes, not UTF-8
        json.dumps({"path": "good.wav", "caption": "x" * 20_000}).encode(),
        b'{"path": "good.wav", "caption": "piano \\udc80"}',  # a lone surrogate escape
        b'{"path": "good.wav", "start_s": NaN}',
        b'{"path": "good.wav", "start_s": 0, "end_s": Infinity}',
        b"[" * 100_000,  # nesting deep enough to overflow a recursive parser
        json.dumps({"path": "absent.wav"}).encode(),
        json.dumps({"path": "good.wav", "tags": 7}).encode(),
        b"\xff\xfe\x00garbage",
    ]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="manifest", input=str(manifest), sample_rate=SR), out, progress=False)
    got = examples(out)
    assert list(got) == ["m.jsonl:1:good.wav"]
    assert got["m.jsonl:1:good.wav"]["caption"].decode() == long_ok.strip()
    skipped = {int(s["item"].split(":")[1]): (s["reason"], s["detail"]) for s in report.skipped}
    assert sorted(skipped) == list(range(2, 11))
    assert {n: r for n, (r, _) in skipped.items()} == {n: audio_io.BAD_ENTRY for n in range(2, 11) if n != 8} | {
        8: audio_io.MISSING}
    assert skipped[2][1] == skipped[10][1] == "line is not valid UTF-8"
    assert skipped[3][1] == f"caption of 20000 characters is longer than {sources.MAX_CAPTION_CHARS}"
    assert "not valid UTF-8" in skipped[4][1]
    assert "not a finite number" in skipped[5][1] and "not a finite number" in skipped[6][1]


def test_hostile_csv_rows_are_counted_skips(tmp_path):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    sf.write(str(audio_dir / "good.wav"), tone(SR, 10.0), SR)
    header = b"ytid,start_s,end_s,aspect_list,caption\n"
    rows = [b"good,0,10,\"['piano']\",a piano\n",
            b"good,0,10,[],caf\xe9 au lait\n",  # Latin-1 caption
            b"good,0,inf,[],endless\n",
            b"good,nan,10,[],no start\n",
            b"good,0\n",  # a short row: missing cells
            b"good,0,10,\"['unclosed\",bad list\n"]
    (tmp_path / "mc.csv").write_bytes(header + b"".join(rows))
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="musiccaps", input=str(tmp_path / "mc.csv"), audio_dir=str(audio_dir),
                                     sample_rate=SR, segment_seconds=0.0), out, progress=False)
    got = examples(out)
    assert list(got) == ["good@0"] and got["good@0"]["caption"].decode() == "a piano"
    assert [s["reason"] for s in report.skipped] == [audio_io.BAD_ENTRY] * 5
    assert "row 3 is not valid UTF-8" in report.skipped[0]["detail"]
    assert "not a finite number" in report.skipped[1]["detail"] and "not a finite number" in report.skipped[2]["detail"]


def test_csv_missing_columns_is_one_line(tmp_path):
    with open(tmp_path / "bad.csv", "w", newline="") as f:
        csv.writer(f).writerows([["ytid", "caption"], ["abc", "a tune"]])
    (tmp_path / "audio").mkdir()
    with pytest.raises(PrepareError, match=r"is not a MusicCaps CSV: missing columns \['end_s', 'start_s'\]"):
        prepare(PrepareSettings(source="musiccaps", input=str(tmp_path / "bad.csv"), audio_dir=str(tmp_path / "audio")),
                str(tmp_path / "out"), progress=False)
    out = run_cli("launch.prepare_data", "--source=musiccaps", f"--input={tmp_path / 'bad.csv'}",
                  f"--audio_dir={tmp_path / 'audio'}", f"--out={tmp_path / 'out2'}", timeout=240)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert errors == [f"error: {tmp_path / 'bad.csv'} is not a MusicCaps CSV: missing columns ['end_s', 'start_s']"]
