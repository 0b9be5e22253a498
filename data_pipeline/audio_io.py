"""Decode, check, resample and cut real audio for preparation; every rejection has a reason.

Files are decoded with soundfile (libsndfile: wav, flac, ogg/vorbis/opus, mp3, aiff, au) in blocks,
downmixed to mono and resampled with a streaming soxr resampler. Preparation never holds a long file:
a first pass (`scan`) measures its length and peak, a second decodes it again and `cut`s each clip as
soon as it is complete, so memory is one clip plus one block whatever the file's length; a file of one
clip is kept from the first pass instead of decoded twice. Anything wrong raises `BadAudio(reason, detail)`; callers
skip the file and count the reason, so a bad file never crashes preparation and never turns into a
silently wrong example.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import soxr

from data_pipeline import mpeg_frames

# Reasons a file (or a segment of one) is skipped, as they appear in the preparation report.
MISSING = "missing file"
NOT_A_FILE = "not a regular file"
EMPTY_FILE = "empty file"
UNSUPPORTED = "unsupported format"
CORRUPT = "unreadable or corrupt"
NO_AUDIO = "zero-length audio"
NON_FINITE = "NaN/Inf samples"
SILENT = "silent"
TOO_SHORT = "shorter than minimum"
BAD_RANGE = "time range outside file"
BAD_ENTRY = "bad metadata entry"
OUT_OF_RANGE = "sample values out of range"
DUPLICATE = "duplicate entry"
UNREADABLE = "unreadable (no permission or I/O error)"

# Extensions libsndfile decodes; other audio extensions are listed so they are reported, not ignored.
DECODABLE = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au"})
AUDIO_EXTENSIONS = DECODABLE | {".m4a", ".aac", ".wma", ".webm", ".mp4"}

BLOCK_SECONDS = 20.0  # of the source file per read: bounds memory, never changes the data
_RETRY_FRAMES = 1024  # after a decoder error, read again in steps this small to keep what precedes the damage
_TRUNCATED_DATA = re.compile(r"^(?:data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)


class BadAudio(Exception):
    """A file or segment that must be skipped: `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def check_file(path: str) -> None:
    """Raises BadAudio unless `path` is a non-empty regular file (a FIFO would block a reader)."""
    if not os.path.lexists(path):
        raise BadAudio(MISSING, path)
    if not os.path.isfile(path):
        raise BadAudio(NOT_A_FILE, path)
    if os.path.getsize(path) == 0:
        raise BadAudio(EMPTY_FILE)
    try:
        with open(os.fsencode(path), "rb") as f:
            f.read(1)
    except OSError as e:  # libsndfile would call this "System error" and we "corrupt"
        raise BadAudio(UNREADABLE, e.strerror or str(e)) from None


def duration(path: str) -> float:
    """Seconds of audio in `path` from its header (raises BadAudio if it cannot be opened)."""
    check_file(path)
    with _decoder_errors(path), sf.SoundFile(os.fsencode(path)) as f:  # bytes: names that are not UTF-8 open too
        return f.frames / f.samplerate


@contextlib.contextmanager
def _decoder_errors(path: str) -> Iterator[None]:
    """libsndfile's and numpy's exceptions as BadAudio with a reason a user can act on."""
    ext = os.path.splitext(path)[1].lower()
    try:
        yield
    except BadAudio:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, OSError, MemoryError) as e:
        text = " ".join(str(e).split())
        if "Format not recognised" in text or "possibly a pipe" in text or "unknown format" in text.lower():
            text = f"its contents are not {ext or 'audio'} audio (a file of another kind under an audio name?)"
        raise BadAudio(CORRUPT if ext in DECODABLE else UNSUPPORTED, f"{type(e).__name__}: {text}") from e


def decode_blocks(path: str, sample_rate: int, start_s: float | None = None, end_s: float | None = None,
                  notes: list[str] | None = None, block_seconds: float = BLOCK_SECONDS) -> Iterator[np.ndarray]:
    """Mono float32 audio of `path` (optionally only [start_s, end_s)) at `sample_rate`, in blocks of about
    `block_seconds` of the file, so no array of the whole file's length exists. One soxr stream resamples
    across block edges: the concatenated blocks equal `soxr.resample` of the whole range. What was kept
    despite a defect (a file shorter than its header says, a decoder that stopped) is appended to `notes`."""
    check_file(path)
    with _decoder_errors(path), sf.SoundFile(os.fsencode(path)) as f:
        if f.frames <= 0:
            raise BadAudio(NO_AUDIO)
        cut = _TRUNCATED_DATA.search(f.extra_info)  # libsndfile reads a cut WAV/AIFF as the frames present
        if cut and notes is not None and int(cut[2]) < int(cut[1]):
            notes.append(f"truncated: its header promises {f.frames * int(cut[1]) / int(cut[2]) / f.samplerate:.2f} s, "
                         f"{f.frames / f.samplerate:.2f} s decoded and kept")
        start = 0 if start_s is None else int(round(start_s * f.samplerate))
        stop = f.frames if end_s is None else int(round(end_s * f.samplerate))
        if start < 0 or start >= f.frames or stop <= start or stop > f.frames + f.samplerate // 10:
            raise BadAudio(BAD_RANGE, f"[{start_s}, {end_s}) s of a {f.frames / f.samplerate:.2f}-s file")
        stop = min(stop, f.frames)
        if start:
            f.seek(start)
        resampler = soxr.ResampleStream(f.samplerate, sample_rate, 1, dtype="float32") if f.samplerate != sample_rate else None
        step, remaining, failure, noted = max(1, int(block_seconds * f.samplerate)), stop - start, None, False
        while remaining > 0:
            try:
                x = f.read(min(step, remaining), dtype="float32", always_2d=True)
            except sf.LibsndfileError as e:  # a cut or damaged FLAC/MP3: keep what decodes before the damage
                failure = failure or e  # the first error says what happened
                if step > _RETRY_FRAMES:
                    f.seek(stop - remaining)
                    step = _RETRY_FRAMES
                    continue
                if remaining == stop - start:
                    raise failure from None
                x = np.zeros((0, 1), np.float32)
            if len(x) == 0:  # header promised more frames than the file holds: keep what decoded, say so
                if notes is not None:
                    noted = True
                    notes.append(f"truncated: its header promises {(stop - start) / f.samplerate:.2f} s, "
                                 f"{(stop - start - remaining) / f.samplerate:.2f} s decoded and kept"
                                 + (f" (the decoder stopped: {' '.join(str(failure).split())})" if failure else ""))
                break
            finite = np.isfinite(x).all(axis=1)
            if not finite.all():  # the first bad sample's time in the file, not its block's end
                at = stop - remaining + int(np.argmin(finite))
                raise BadAudio(NON_FINITE, f"at {at / f.samplerate:.3f} s")
            remaining -= len(x)
            mono = x.mean(axis=1, dtype=np.float64).astype(np.float32)  # float32 sums overflow near 3e38
            yield _finite(resampler.resample_chunk(mono) if resampler else mono)
        if resampler:
            yield _finite(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
        if notes is not None and not noted and path.lower().endswith(".mp3") and (start, stop) == (0, f.frames):
            notes += mpeg_frames.notes(path, stop - remaining)  # cuts that neither its header nor libsndfile shows


def _finite(block: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(block)):  # the input was finite, so resampling overflowed float32
        raise BadAudio(OUT_OF_RANGE, "samples near the float32 limit overflow when resampled")
    return block


def decode(path: str, sample_rate: int, start_s: float | None = None, end_s: float | None = None,
           notes: list[str] | None = None) -> np.ndarray:
    """All of `decode_blocks` in one array (for short files and callers that need the whole audio)."""
    audio = np.concatenate([np.zeros(0, np.float32), *decode_blocks(path, sample_rate, start_s, end_s, notes)])
    if audio.size == 0:
        raise BadAudio(NO_AUDIO)
    return audio


def check_level(frames: int, peak: float, sample_rate: int, min_seconds: float, silence_db: float) -> None:
    """Raises BadAudio for empty, too short or silent (peak below `silence_db` dBFS) audio of `frames` samples."""
    if frames == 0:
        raise BadAudio(NO_AUDIO)
    if frames < min_seconds * sample_rate:
        raise BadAudio(TOO_SHORT, f"{frames / sample_rate:.2f} s < {min_seconds} s")
    if peak <= 10.0 ** (silence_db / 20.0):
        level = 20.0 * np.log10(peak) if peak > 0 else -np.inf
        raise BadAudio(SILENT, f"peak {level:.1f} dBFS <= {silence_db} dBFS")


def check_audio(audio: np.ndarray, sample_rate: int, min_seconds: float, silence_db: float) -> None:
    """`check_level` of an array, which must also be finite."""
    if audio.size and not np.all(np.isfinite(audio)):
        raise BadAudio(NON_FINITE)
    check_level(audio.size, float(np.max(np.abs(audio))) if audio.size else 0.0, sample_rate, min_seconds, silence_db)


@dataclasses.dataclass(frozen=True)
class Scan:
    """What preparation must know of an item before its first clip is written (its length and its one gain),
    from a first pass over its blocks; `clips` cuts it in a second pass unless the first could keep it."""

    frames: int  # samples at the target rate
    peak: float  # largest |sample|
    audio: np.ndarray | None  # the whole audio when it was at most `hold` samples, else None: decoded again
    blocks: Callable[[], Iterable[np.ndarray]]  # the same blocks once more

    def clips(self, ranges: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
        return cut([self.audio] if self.audio is not None else self.blocks(), ranges)


def scan(blocks: Callable[[], Iterable[np.ndarray]], hold: int) -> Scan:
    """One pass over `blocks()`: length and peak, keeping the audio only while it is at most `hold` samples."""
    kept: list[np.ndarray] | None = []
    frames, peak = 0, 0.0
    for block in blocks():
        if block.size:
            if not np.all(np.isfinite(block)):
                raise BadAudio(NON_FINITE, f"at sample {frames + int(np.argmin(np.isfinite(block)))}")
            peak = max(peak, float(np.max(np.abs(block))))
        frames += len(block)
        if kept is not None:
            kept.append(block)
            kept = kept if frames <= hold else None
    audio = np.concatenate([np.zeros(0, np.float32), *kept]) if kept is not None else None
    return Scan(frames, peak, audio, blocks)


def cut(blocks: Iterable[np.ndarray], ranges: Sequence[tuple[int, int]]) -> Iterator[np.ndarray]:
    """The audio of each of the contiguous `ranges` (from sample 0) of the blocks' concatenation, each yielded
    as soon as its last sample has arrived: at most one range and one block are held."""
    source = iter(blocks)
    pending: list[np.ndarray] = []
    base = have = 0  # where pending starts; how many samples it holds
    for start, stop in ranges:
        assert start == base, "ranges must be contiguous from 0"
        while base + have < stop:
            block = next(source, None)
            if block is None:
                raise BadAudio(CORRUPT, f"the file changed while it was prepared: {base + have} of {ranges[-1][1]} "
                                        "samples on the second read")
            pending.append(block)
            have += len(block)
        joined = np.concatenate(pending)
        rest = joined[stop - base:].copy()  # a copy, so the clip does not keep the block tail alive
        pending, have, base = [rest], len(rest), stop
        yield joined[: stop - start]


def split_segments(n: int, segment: int, minimum: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of at most `segment` samples covering n; a tail shorter than `minimum`
    joins the previous segment instead of being dropped. segment <= 0 means one range."""
    if segment <= 0 or n <= segment:
        return [(0, n)]
    starts = list(range(0, n, segment))
    if n - starts[-1] < minimum:
        starts.pop()
    return [(b, starts[i + 1] if i + 1 < len(starts) else n) for i, b in enumerate(starts)]


def limit_peak(audio: np.ndarray, peak: float | None = None) -> np.ndarray:
    """Audio whose peak (`peak`: that of the whole item a clip belongs to) exceeds full scale (float files) is
    scaled down to 1.0, never clipped."""
    peak = (float(np.max(np.abs(audio))) if audio.size else 0.0) if peak is None else peak
    return audio / np.float32(peak) if peak > 1.0 else audio


def to_pcm(audio: np.ndarray, dtype: str) -> np.ndarray:
    """Float audio in [-1, 1] → stored PCM: int16 (round to nearest of ±32767) or float32."""
    if dtype == "int16":
        return np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
    if dtype == "float32":
        return audio.astype(np.float32)
    raise ValueError(f"pcm dtype must be 'int16' or 'float32', got {dtype!r}")


def from_pcm(pcm: np.ndarray) -> np.ndarray:
    """Stored PCM → float32, scaled as the training input pipeline scales it (int16 / 32768)."""
    return pcm.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
