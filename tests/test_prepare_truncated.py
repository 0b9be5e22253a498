"""Issue 27, case 15: a cut FLAC or MP3 is kept as far as it decodes, with a note in the report, also where
its header does not reveal the cut (MP3 without a Xing/Info header: libsndfile trusts a size estimate)."""
from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf

from data_pipeline import audio_io, mpeg_frames

SR = 8000
MP3_SR = 44100


def tone(seconds: float, sr: int = SR) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * (300 + 40 * np.sin(2 * np.pi * t / 3)) * t)).astype(np.float32)


def _cut(path, fraction: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def test_a_cut_flac_keeps_what_decodes_with_a_note(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(str(path), tone(8.0), SR)
    _cut(path, 0.5)  # STREAMINFO still says 8 s; libsndfile loses sync at the cut
    notes: list[str] = []
    audio = audio_io.decode(str(path), SR, notes=notes)
    # the cut is near 4 s: kept up to about the last whole FLAC frame (0.5 s); the failed 20-s read is read again
    assert 3.0 * SR < len(audio) < 4.0 * SR
    np.testing.assert_allclose(audio, tone(8.0)[: len(audio)], atol=1e-4)  # 16-bit
    assert notes == [f"truncated: its header promises 8.00 s, {len(audio) / SR:.2f} s decoded and kept "
                     "(the decoder stopped: Error : flac decoder lost sync.)"]
    path.write_bytes(path.read_bytes()[:200])  # nothing but the header and a broken first frame: still corrupt
    with pytest.raises(audio_io.BadAudio) as e:
        audio_io.decode(str(path), SR)
    assert e.value.reason == audio_io.CORRUPT


@pytest.fixture(scope="module")
def mp3(tmp_path_factory) -> bytes:
    """6 s of a tone, then 6 s of noise: the encoder's bitrate varies, as it does in music."""
    path = tmp_path_factory.mktemp("mp3") / "vbr.mp3"
    noise = 0.3 * np.random.default_rng(0).standard_normal(6 * MP3_SR).astype(np.float32)
    sf.write(str(path), np.concatenate([tone(6.0, MP3_SR), noise]), MP3_SR, format="MP3", bitrate_mode="VARIABLE")
    return path.read_bytes()


def _decode(path, data: bytes) -> tuple[float, list[str]]:
    path.write_bytes(data)
    notes: list[str] = []
    return len(audio_io.decode(str(path), MP3_SR, notes=notes)) / MP3_SR, notes


def test_mp3_cuts_its_header_hides_get_a_note(mp3, tmp_path):
    path = tmp_path / "x.mp3"
    first_frame = mpeg_frames._header(mp3[:4])[3]
    assert mp3[4:first_frame].find(b"Xing") > 0  # libsndfile writes a Xing header with the frame count
    id3v2, id3v1 = b"ID3\x03\x00\x00\x00\x00\x01\x00" + bytes(128), b"TAG" + bytes(125)
    seconds, notes = _decode(path, id3v2 + mp3 + id3v1)  # intact, with tags before and after: no note
    assert abs(seconds - 12.0) < 0.05 and notes == []
    seconds, notes = _decode(path, mp3[: len(mp3) // 2])  # the Xing frame count reveals this cut (as before)
    assert notes == [f"truncated: its header promises 12.00 s, {seconds:.2f} s decoded and kept"]

    bare = mp3[first_frame:]  # no Xing frame: libsndfile estimates the length from the first frame's bitrate
    seconds, notes = _decode(path, bare)
    assert seconds < 8.0 and len(notes) == 1, notes
    held = re.fullmatch(r"its MPEG frames hold ([\d.]+) s but the decoder stops at its length estimate \(no Xing/VBRI "
                        rf"header\): {seconds:.2f} s decoded and kept", notes[0])
    # 12 s, the encoder's delay (576 + 529 samples) and the last frame's padding: at most 3 frames more
    assert held and 12.0 <= float(held[1]) <= 12.0 + 3 * 1152 / MP3_SR, notes
    seconds, notes = _decode(path, bare[: len(bare) // 2 + 7])  # cut inside a frame: the walk sees its end missing
    assert notes[0].startswith("truncated: the file ends ") and notes[0].endswith(
        f" bytes into an MPEG frame; {seconds:.2f} s decoded and kept")
