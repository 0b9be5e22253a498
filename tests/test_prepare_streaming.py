"""Issue 27, case 17: preparation streams long files (decode and resample block by block, clips written as
they complete), so its memory is flat in the file's length (`python -m benchmarks.prepare_memory` for RSS).
"""
from __future__ import annotations

import tracemalloc

import numpy as np
import soundfile as sf
import soxr
import tensorflow_datasets as tfds

from data_pipeline import audio_io, sources
from data_pipeline.builder import PrepareSettings, find_prepared, prepare

SOURCE_SR, SR = 11025, 8000


def tones(seconds: float, sr: int = SOURCE_SR, channels: int = 2, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    left = np.sin(2 * np.pi * (300 + 40 * np.sin(2 * np.pi * t / 3)) * t)
    return (level * np.stack([left, np.sin(2 * np.pi * 523 * t)], axis=1)[:, :channels]).astype(np.float32)


def test_streamed_clips_equal_the_whole_file_resample_and_reads_are_blocks(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    audio = tones(12.6, level=1.5)  # a float file above full scale: every clip gets the whole file's gain
    sf.write(str(folder / "long.wav"), audio, SOURCE_SR, subtype="FLOAT")
    reads: list[int] = []
    real_read = sf.SoundFile.read

    def read(self, frames=-1, *args, **kwargs):
        reads.append(frames)
        return real_read(self, frames, *args, **kwargs)

    monkeypatch.setattr(sf.SoundFile, "read", read)
    block = 0.05  # seconds of the source per read: 551 frames, so a clip spans many blocks and resampler edges
    out = str(tmp_path / "out")
    report = prepare(PrepareSettings(source="folder", input=str(folder), sample_rate=SR, pcm="float32",
                                     segment_seconds=3.0, min_seconds=1.0, block_seconds=block, workers=1), out,
                     progress=False)
    # two passes (length and peak, then the clips), each in reads of at most one block
    assert max(reads) == int(block * SOURCE_SR) and sum(reads) == 2 * len(audio)

    whole = soxr.resample(audio.mean(axis=1, dtype=np.float64).astype(np.float32), SOURCE_SR, SR)
    whole = whole / np.float32(np.max(np.abs(whole)))
    ranges = audio_io.split_segments(len(whole), 3 * SR, SR)
    assert len(ranges) == 4 and report.examples_written == 4  # 3 + 3 + 3 + 3.6 s: the 0.6-s tail joins the last clip
    ds = tfds.builder_from_directory(find_prepared(out)).as_dataset(split="train")
    clips = sorted((float(ex["offset_s"]), ex["audio"]) for ex in tfds.as_numpy(ds))
    assert [offset for offset, _ in clips] == [start / SR for start, _ in ranges]
    for (_, clip), (start, stop) in zip(clips, ranges):
        # soxr's stream state carries across blocks: equal to the one-shot resample within 1e-6 (measured: 0)
        np.testing.assert_allclose(clip, whole[start:stop], rtol=0, atol=1e-6)


def _first_pass_and_clips(path: str, segment_s: float, block_s: float) -> tuple[int, int]:
    """What the builder runs for one file (its `_load`, then the clips), clips dropped as they come;
    returns (samples prepared, traced peak bytes)."""
    segment, minimum = int(segment_s * SR), SR
    item = sources.SourceItem(key="x", path=path)
    tracemalloc.start()
    try:
        first = sources.load_item(item, SR, [], hold=segment + minimum - 1, block_seconds=block_s)[0]
        ranges = audio_io.split_segments(first.frames, segment, minimum)
        total = sum(len(audio_io.limit_peak(clip, first.peak)) for clip in first.clips(ranges))
        return total, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_of_a_file_is_flat_in_its_length(tmp_path):
    peaks = {}
    for minutes in (1, 4):
        path = str(tmp_path / f"{minutes}.wav")
        with sf.SoundFile(path, "w", SOURCE_SR, 2, "PCM_16") as f:  # written in pieces: 4 min of the same 10 s
            for _ in range(6 * minutes):
                f.write(tones(10.0))
        total, peaks[minutes] = _first_pass_and_clips(path, segment_s=5.0, block_s=1.0)
        assert abs(total - minutes * 60 * SR) <= 1
    whole_4min = 4 * 60 * SR * 4  # bytes of the 4-min file as float32 at the target rate (7.7 MB)
    # measured: 0.76 MB for both lengths (a 5-s clip and its copies, a 1-s block of stereo float32 and float64);
    # an array of the whole 4-min file would be 7.7 MB on its own
    assert peaks[4] < 1.1 * peaks[1] + 50_000, peaks
    assert peaks[4] < whole_4min / 4, peaks
