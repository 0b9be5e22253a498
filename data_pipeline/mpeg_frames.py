"""A walk over an MP3's frame headers: what its frames hold, to catch the cuts its header does not state.

libsndfile takes an MP3's length from its Xing/Info/VBRI header, or, without one, estimates it from the
file size and the first frame's bitrate, and never decodes past that length. A cut file without such a
header then decodes as shorter audio that looks whole, and a variable-bitrate file without one stops at
a wrong estimate. Counting the frames (ISO 11172-3 / 13818-3 headers: 4 bytes each, no decoding) tells
both apart: a last frame that the file ends inside, or frames that hold more audio than the decoder gives.
"""
from __future__ import annotations

import dataclasses
import os

_BITRATES = {  # kbit/s by (MPEG-1?, layer), index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_BITRATES[(False, 3)] = _BITRATES[(False, 2)]
_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version bits
_TRAILERS = (b"TAG", b"APETAGEX", b"LYRICS")  # ID3v1, APE and Lyrics3 tags after the last frame


@dataclasses.dataclass(frozen=True)
class MpegFrames:
    samples: int  # per channel, in the whole frames (encoder delay and padding included)
    sample_rate: int
    cut_bytes: int  # bytes of a last frame the file ends inside (0: it ends on a frame boundary)


def _header(b: bytes) -> tuple[int, int, int, int] | None:
    """(version bits, sample rate, samples per frame, frame bytes) of a 4-byte frame header, else None."""
    if len(b) < 4 or b[0] != 0xFF or b[1] & 0xE0 != 0xE0:
        return None
    version, layer_bits, rate_index, bitrate_index = (b[1] >> 3) & 3, (b[1] >> 1) & 3, (b[2] >> 2) & 3, b[2] >> 4
    if version == 1 or layer_bits == 0 or rate_index == 3 or bitrate_index in (0, 15):  # reserved or free format
        return None
    layer, mpeg1 = 4 - layer_bits, version == 3
    rate, kbps, pad = _RATES[version][rate_index], _BITRATES[(mpeg1, layer)][bitrate_index - 1], (b[2] >> 1) & 1
    if layer == 1:
        return version, rate, 384, (12000 * kbps // rate + pad) * 4
    per_frame = 1152 if layer == 2 or mpeg1 else 576
    return version, rate, per_frame, per_frame // 8 * 1000 * kbps // rate + pad


def walk(path: str) -> MpegFrames | None:
    """The frames of an MP3 (after an ID3v2 tag), or None where they do not run cleanly from start to end."""
    size = os.path.getsize(path)
    with open(os.fsencode(path), "rb") as f:
        head = f.read(10)
        pos = 10 + sum((c & 0x7F) << (21 - 7 * i) for i, c in enumerate(head[6:10])) if head[:3] == b"ID3" else 0
        first, samples = None, 0
        while pos < size:
            f.seek(pos)
            raw = f.read(8)
            frame = _header(raw[:4])
            if first is not None and frame is not None and frame[:2] != first[:2]:
                frame = None  # another version or rate mid-stream: not a frame of this stream
            if frame is None:
                if first is not None and any(raw.startswith(t) for t in _TRAILERS):
                    break
                if first is not None and size - pos < 4 and raw[:1] == b"\xff":
                    return MpegFrames(samples, first[1], size - pos)  # the file ends inside a frame header
                return None  # junk before or between frames: damage a walk cannot measure
            first = first or frame
            if pos + frame[3] > size:
                return MpegFrames(samples, frame[1], size - pos)
            samples, pos = samples + frame[2], pos + frame[3]
    return MpegFrames(samples, first[1], 0) if first else None


def notes(path: str, decoded: int) -> list[str]:
    """What a walk finds that the `decoded` frames of the whole file hide: a cut last frame, or frames holding
    more audio than the decoder gave (it stops at its estimate for a variable-bitrate file without a
    Xing/VBRI header)."""
    frames = walk(path)
    if frames is None:
        return []
    out, kept = [], decoded / frames.sample_rate
    if frames.cut_bytes:
        out.append(f"truncated: the file ends {frames.cut_bytes} bytes into an MPEG frame; "
                   f"{kept:.2f} s decoded and kept")
    if frames.samples - decoded > 4 * 1152:  # beyond encoder delay, padding and the Xing frame
        out.append(f"its MPEG frames hold {frames.samples / frames.sample_rate:.2f} s but the decoder stops at its "
                   f"length estimate (no Xing/VBRI header): {kept:.2f} s decoded and kept")
    return out
