"""The four sources of preparation: an audio folder, a JSONL manifest, a MusicCaps CSV, the synthetic set.

Listing a source is cheap (no decoding) and yields `SourceItem`s in a stable order; an entry that is
broken before any audio is touched (an unparsable manifest line, a CSV row naming a file that is
not there, an unreadable sidecar) is still yielded, carrying its skip reason in `error`, so the
preparation report names it. `load_item` then decodes (or synthesises) the audio of one item.
"""
from __future__ import annotations

import ast
import csv
import dataclasses
import functools
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any


from data_pipeline import audio_io
from data_pipeline.synthetic import clip_seed, generate_clip

SOURCES = ("folder", "manifest", "musiccaps", "synthetic")
# A MusicCaps file shorter than the CSV's end time but this close to (end - start) is taken to be
# the already-cut 10-s clip (a common way these files are distributed).
PRECUT_TOLERANCE_S = 0.5
# Far beyond any real caption (MusicCaps: ~300 characters); a longer one is a broken entry.
MAX_CAPTION_CHARS = 10_000


@dataclasses.dataclass(frozen=True)
class SourceItem:
    key: str  # unique and stable: the name in the report and the example's `source` feature
    path: str | None = None  # audio file; None for synthetic items
    caption: str = ""
    tags: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    start_s: float | None = None
    end_s: float | None = None
    error: tuple[str, str] | None = None  # (reason, detail): skip without decoding
    synthetic: tuple[int, int, float] | None = None  # (dataset seed, clip index, seconds)


def _tags(value: Any) -> tuple[str, ...]:
    """Tags given as a list or as one comma-separated string."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"tags must be a list or a comma-separated string, got {type(value).__name__}")
    return tuple(str(t).strip() for t in value if str(t).strip())


def _described(key: str, path: str, meta: Mapping[str, Any], **extra: Any) -> SourceItem:
    """An item whose caption/tags/extra attributes come from a JSON-like mapping."""
    caption = meta.get("caption") or ""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    if len(caption) > MAX_CAPTION_CHARS:
        raise ValueError(f"caption of {len(caption)} characters is longer than {MAX_CAPTION_CHARS}")
    tags = _tags(meta.get("tags"))
    for text in (caption, *tags):
        _utf8(text, "caption or tag")
    rest = {k: v for k, v in meta.items() if k not in ("path", "caption", "tags", "start_s", "end_s")}
    return SourceItem(key=key, path=path, caption=caption.strip(), tags=tags, attributes=rest, **extra)


def _seconds(value: Any, name: str) -> float | None:
    """A time in seconds from metadata: None, or a finite number (NaN/inf would break decoding)."""
    if value is None:
        return None
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{name}={value!r} is not a finite number")
    return seconds


def _utf8(text: str, where: str) -> str:
    """`text` unless it holds a lone surrogate (from bytes that were not UTF-8, read with
    errors='surrogateescape', or a JSON '\\ud800' escape), which no UTF-8 writer accepts → ValueError."""
    if any("\ud800" <= ch <= "\udfff" for ch in text):
        raise ValueError(f"{where} is not valid UTF-8")
    return text


def _printable(name: str) -> str:
    """A key that encodes as UTF-8 whatever bytes a file name holds (bad bytes as \\xNN escapes)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def folder_items(root: str) -> Iterator[SourceItem]:
    """Audio files under `root` (recursively, sorted), each with an optional sidecar caption:
    `x.json` ({"caption": ..., "tags": [...] | "a, b", other keys → attributes}) or `x.txt`."""
    unreadable: list[OSError] = []

    def unlisted() -> Iterator[SourceItem]:
        """Folders that could not be listed: reported (their files are unknown), never silently lost."""
        while unreadable:
            e = unreadable.pop(0)
            yield SourceItem(key=_printable(os.path.relpath(e.filename, root)) + "/",
                             error=(audio_io.UNREADABLE, f"folder could not be listed: {e.strerror or e}"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable.append):
        yield from unlisted()
        dirnames.sort()
        for name in sorted(filenames):
            stem, ext = os.path.splitext(name)
            if ext.lower() not in audio_io.AUDIO_EXTENSIONS:
                continue
            path = os.path.join(dirpath, name)
            key = _printable(os.path.relpath(path, root))
            side = os.path.join(dirpath, stem)
            try:
                if os.path.exists(side + ".json"):
                    with open(side + ".json", encoding="utf-8") as f:
                        meta = json.load(f)
                    if not isinstance(meta, dict):
                        raise ValueError("sidecar JSON must be an object")
                    yield _described(key, path, meta)
                elif os.path.exists(side + ".txt"):
                    with open(side + ".txt", encoding="utf-8") as f:
                        yield _described(key, path, {"caption": f.read()})
                else:
                    yield SourceItem(key=key, path=path)
            except (OSError, ValueError, RecursionError) as e:
                yield SourceItem(key=key, path=path, error=(audio_io.BAD_ENTRY, f"sidecar: {e}"))
    yield from unlisted()


def manifest_items(manifest: str) -> Iterator[SourceItem]:
    """One JSON object per line: `path` (relative to the manifest's folder unless absolute),
    optional `caption`, `tags`, `start_s`/`end_s`; other keys become attributes."""
    base = os.path.dirname(os.path.abspath(manifest))
    with open(manifest, "rb") as f:  # decoded per line, so one line of bad bytes skips only itself
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            key = f"{os.path.basename(manifest)}:{lineno}"
            try:
                meta = json.loads(raw.decode("utf-8"))
                if not isinstance(meta, dict) or not isinstance(meta.get("path"), str) or not meta["path"]:
                    raise ValueError("each line must be a JSON object with a string 'path'")
                path = os.path.join(base, _utf8(meta["path"], "path"))
                start, end = _seconds(meta.get("start_s"), "start_s"), _seconds(meta.get("end_s"), "end_s")
                yield _described(_printable(f"{key}:{meta['path']}"), path, meta, start_s=start, end_s=end)
            except UnicodeDecodeError:
                yield SourceItem(key=key, error=(audio_io.BAD_ENTRY, "line is not valid UTF-8"))
            except (ValueError, TypeError, RecursionError) as e:
                yield SourceItem(key=key, error=(audio_io.BAD_ENTRY, str(e).splitlines()[0] if str(e) else type(e).__name__))


def unique_keys(items: Iterable[SourceItem]) -> Iterator[SourceItem]:
    """Usable items whose key an earlier usable item has (two CSV rows with one ytid and start, a file
    name that escapes to another's key) become skips under `<key> (duplicate N)`, never a dataset error.
    Items already skipped keep their own reason: they are never written, so their keys cannot clash."""
    seen: dict[str, int] = {}
    for item in items:
        if item.error:
            yield item
            continue
        count = seen.get(item.key, 0)
        seen[item.key] = count + 1
        if count:
            item = SourceItem(key=f"{item.key} (duplicate {count})", path=item.path,
                              error=(audio_io.DUPLICATE, f"same key as an earlier entry: {item.key}"))
        yield item


def _find_ytid(audio_dir: str, ytid: str) -> str | None:
    for ext in sorted(audio_io.AUDIO_EXTENSIONS):
        path = os.path.join(audio_dir, ytid + ext)
        if os.path.lexists(path):
            return path
    return None


def _escapes(name: str) -> bool:
    """A name that would reach outside the folder it is joined to (`../x`, `/abs`, `a/b`, `..`)."""
    return name in (".", "..") or "/" in name or "\\" in name or os.path.isabs(name) or "\0" in name


def musiccaps_items(csv_path: str, audio_dir: str) -> Iterator[SourceItem]:
    """Rows of a MusicCaps CSV (ytid, start_s, end_s, aspect_list, caption, ...) over files named
    `<ytid>.<ext>` in `audio_dir`; the row's time range selects the segment. aspect_list → tags,
    the other columns → attributes."""
    with open(csv_path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        missing = {"ytid", "start_s", "end_s"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{csv_path} is not a MusicCaps CSV: missing columns {sorted(missing)}")
        for rowno, row in enumerate(reader, 2):
            key = f"{row.get('ytid') or 'row'}@{row.get('start_s')}".encode("utf-8", "replace").decode("utf-8")
            try:
                for value in row.values():
                    _utf8(value if isinstance(value, str) else "", f"row {rowno}")
                start, end = _seconds(row["start_s"], "start_s"), _seconds(row["end_s"], "end_s")
                if not row["ytid"] or end <= start:
                    raise ValueError(f"row {rowno}: need a ytid and end_s > start_s")
                if _escapes(row["ytid"]):
                    raise ValueError(f"row {rowno}: ytid {row['ytid'][:40]!r} is not a plain name (paths stay "
                                     "inside --audio_dir)")
                aspects = row.get("aspect_list") or "[]"
                tags = ast.literal_eval(aspects) if aspects.lstrip().startswith("[") else aspects
                meta = {k: v for k, v in row.items() if k not in ("ytid", "aspect_list") and k is not None}
                meta.update(tags=tags, ytid=row["ytid"])
            except (ValueError, SyntaxError, TypeError) as e:
                yield SourceItem(key=key, error=(audio_io.BAD_ENTRY, str(e)))
                continue
            path = _find_ytid(audio_dir, row["ytid"])
            if path is None:
                yield SourceItem(key=key, error=(audio_io.MISSING, f"{row['ytid']}.* in {audio_dir}"))
                continue
            try:  # an already-cut clip: use all of it
                length = audio_io.duration(path)
                if length < end and abs(length - (end - start)) <= PRECUT_TOLERANCE_S:
                    start, end = None, None
            except audio_io.BadAudio:
                pass  # decoding reports it
            try:
                yield _described(key, path, meta, start_s=start, end_s=end)
            except ValueError as e:
                yield SourceItem(key=key, error=(audio_io.BAD_ENTRY, str(e)))


def synthetic_items(num_clips: int, seed: int, clip_seconds: float) -> Iterator[SourceItem]:
    for i in range(num_clips):
        yield SourceItem(key=f"synthetic/{seed}/{i:07d}", synthetic=(seed, i, clip_seconds))


def list_items(source: str, *, input_path: str = "", audio_dir: str = "", num_clips: int = 0, seed: int = 0,
               clip_seconds: float = 10.0) -> Iterator[SourceItem]:
    """Items of one source (see SOURCES); raises ValueError/FileNotFoundError for a bad --input."""
    if source == "synthetic":
        if num_clips <= 0:
            raise ValueError("--source=synthetic needs --num_clips > 0")
        return unique_keys(synthetic_items(num_clips, seed, clip_seconds))
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {SOURCES}")
    if not input_path or not os.path.exists(input_path):
        raise FileNotFoundError(f"--input {input_path!r} does not exist")
    if source == "folder":
        if not os.path.isdir(input_path):
            raise ValueError(f"--source=folder needs a directory, got {input_path!r}")
        return unique_keys(folder_items(input_path))
    if source == "manifest":
        return unique_keys(manifest_items(input_path))
    if not audio_dir or not os.path.isdir(audio_dir):
        raise FileNotFoundError(f"--source=musiccaps needs --audio_dir, a directory (got {audio_dir!r})")
    return unique_keys(musiccaps_items(input_path, audio_dir))


def load_item(item: SourceItem, sample_rate: int, notes: list[str] | None = None, *, hold: int,
              block_seconds: float = audio_io.BLOCK_SECONDS) -> tuple[audio_io.Scan, str, tuple[str, ...], dict]:
    """(the first pass over the item's mono float32 audio at sample_rate, caption, tags, attributes); raises
    audio_io.BadAudio. Audio longer than `hold` samples is decoded again when cut. Defects the audio was
    kept despite go to `notes`."""
    if item.error:
        raise audio_io.BadAudio(*item.error)
    if item.synthetic:
        seed, index, seconds = item.synthetic
        clip = generate_clip(clip_seed(seed, index), seconds, sample_rate)
        return audio_io.scan(lambda: [clip.audio], hold), clip.caption, tuple(clip.tags), clip.attributes
    first = audio_io.scan(lambda: audio_io.decode_blocks(item.path, sample_rate, item.start_s, item.end_s, notes,
                                                         block_seconds), hold)
    again = functools.partial(audio_io.decode_blocks, item.path, sample_rate, item.start_s, item.end_s,
                              block_seconds=block_seconds)
    attributes = dict(item.attributes)
    if item.start_s is not None:
        attributes.update(start_s=item.start_s, end_s=item.end_s)
    return dataclasses.replace(first, blocks=again), item.caption, item.tags, attributes
