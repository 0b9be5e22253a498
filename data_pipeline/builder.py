"""Preparation as a TFDS GeneratorBasedBuilder: decode, resample, downmix, write TFRecord shards.

`prepare(settings, out_dir)` lists a source, makes each item's first pass (length and peak; the audio
itself only when it is one segment) in a small thread pool (soundfile and soxr release the GIL; results
are consumed in listing order, so the output is deterministic), checks it, and writes one example per
segment of at most `segment_seconds`, each as soon as it is cut (a longer item is decoded again, block
by block: `audio_io.scan`/`cut`, so memory never holds a whole long file):

    audio       int16 (or float32) PCM, mono, at `sample_rate`, stored as raw bytes
    caption     str ("" when the source has none)
    tags        list[str]
    attributes  JSON object as a string (synthetic: the drawn attributes; others: extra metadata)
    source      the item's key (relative path, manifest line, ytid@start, synthetic index)
    offset_s    where the segment starts in the source item
    id          int, unique within the split, in preparation order

The dataset lands in `out_dir/prepared_audio/1.0.0/`; its settings are stored in the dataset's
metadata, so preparing again into the same folder reuses it (same settings) or refuses (different
ones, unless `overwrite`). TFDS is never allowed to look for the dataset on GCS.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
from absl import logging
import tqdm

from data_pipeline import audio_io, sources
from data_pipeline.report import PrepareReport
from data_pipeline.tf_setup import hide_gpus_from_tensorflow
from melody_jax.training.errors import UserError
from melody_jax.training.metrics import json_safe

DATASET_NAME = "prepared_audio"
REPORT_FILE = "prepare_report.json"
WRITER_BUFFER_BYTES = 16 << 20  # serialized clips TFDS holds before it spills them to its sort files


class PrepareError(UserError, ValueError):
    """Preparation cannot run or produced nothing usable; the message says why."""


class EmptySplitError(PrepareError):
    """No usable example for a split: every item of it was skipped (the report says why)."""


@dataclasses.dataclass(frozen=True)
class PrepareSettings:
    """Everything that determines the prepared data (stored in the dataset's metadata)."""

    source: str  # folder | manifest | musiccaps | synthetic
    input: str = ""  # folder, JSONL manifest or MusicCaps CSV
    audio_dir: str = ""  # MusicCaps audio files
    num_clips: int = 0  # synthetic
    seed: int = 0  # synthetic
    clip_seconds: float = 10.0  # synthetic
    sample_rate: int = 24000
    pcm: str = "int16"  # int16 | float32
    min_seconds: float = 1.0  # shorter audio is skipped
    segment_seconds: float = 30.0  # longer audio is cut into segments of at most this (0 = never)
    silence_db: float = -60.0  # audio whose peak is at or below this is skipped as silent
    val_fraction: float = 0.0  # share of items (by a hash of their key) in the 'validation' split
    workers: int = 2  # decoding threads
    block_seconds: float = audio_io.BLOCK_SECONDS  # of a source file per read (memory, not data)

    def validate(self) -> None:
        if self.source not in sources.SOURCES:
            raise PrepareError(f"source must be one of {sources.SOURCES}, got {self.source!r}")
        if self.pcm not in ("int16", "float32"):
            raise PrepareError(f"pcm must be 'int16' or 'float32', got {self.pcm!r}")
        if self.sample_rate < 1000:
            raise PrepareError(f"sample_rate must be at least 1000 Hz, got {self.sample_rate}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise PrepareError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.min_seconds <= 0 or self.segment_seconds < 0 or self.workers < 1 or not self.block_seconds > 0:
            raise PrepareError("min_seconds must be > 0, segment_seconds >= 0, workers >= 1 and block_seconds > 0")
        if self.segment_seconds and self.segment_seconds < self.min_seconds:
            raise PrepareError("segment_seconds must be 0 or at least min_seconds")

    def fingerprint(self) -> dict[str, Any]:
        """The settings that change the data (not `workers` or `block_seconds`)."""
        out = dataclasses.asdict(self)
        out.pop("workers")
        out.pop("block_seconds")
        return out


def _hash_fraction(key: str) -> float:
    """A stable uniform number in [0, 1) for an item key (split assignment)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _ordered_map(fn: Callable, items: Iterable, workers: int) -> Iterator:
    """fn over items in a thread pool, results in input order, at most 2·workers in flight."""
    if workers == 1:
        yield from map(fn, items)
        return
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class PreparedAudio(tfds.core.GeneratorBasedBuilder):
    """Captioned mono audio prepared from one source (see the module docstring for the features)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Mono PCM, caption, tags, JSON attributes, source key, offset, id."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> None:
        """No checksum or metadata files live beside this builder; returning None also keeps TFDS
        from importing `importlib_resources` (not a declared dependency) to look for them."""
        return None

    def __init__(self, *, settings: PrepareSettings, items: list[sources.SourceItem], report: PrepareReport,
                 data_dir: str, progress: bool = True):
        self._settings = settings
        self._items = items
        self._report = report
        self._progress = progress
        self._next_id: dict[str, int] = {}
        super().__init__(data_dir=data_dir)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self._settings
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Captioned mono audio at {s.sample_rate} Hz prepared from source '{s.source}'.",
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Tensor(shape=(None,), dtype=np.dtype(s.pcm), encoding="bytes"),
                "caption": tfds.features.Text(),
                "tags": tfds.features.Sequence(tfds.features.Text()),
                "attributes": tfds.features.Text(),
                "source": tfds.features.Text(),
                "offset_s": np.float32,
                "id": np.int64,
            }),
            metadata=tfds.core.MetadataDict(settings=s.fingerprint()),
        )

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        s, items = self._settings, self._items
        if not s.val_fraction:
            return {"train": self._generate_examples(items, "train")}
        score = {it.key: _hash_fraction(it.key) for it in items}
        ranked = sorted(items, key=lambda it: (score[it.key], it.key))
        count = sum(1 for it in items if score[it.key] < s.val_fraction)
        count = max(count, 1) if len(items) > 1 else count  # a small dataset still gets one validation item
        self._val_keys: set[str] = set()
        # TFDS builds the splits in this order: validation settles which items it took before train starts
        return {"validation": self._validation_examples(ranked, count), "train": self._train_examples(items)}

    def _validation_examples(self, ranked: list[sources.SourceItem], count: int) -> Iterator[tuple[str, dict]]:
        """The `count` best-ranked items; when none of them is usable, the next ranked items one at a time
        until one is (leaving train at least one), so one bad file never empties the split."""
        produced, first = False, {it.key for it in ranked[:count]}
        for batch in [[it for it in self._items if it.key in first]] + [[it] for it in ranked[count:-1]]:
            if produced or not batch:
                break
            self._val_keys.update(it.key for it in batch)
            for example in self._generate_examples(batch, "validation", allow_empty=True):
                produced = True
                yield example
        if not produced:
            raise EmptySplitError(f"split 'validation' has no usable examples: all {len(self._val_keys)} items "
                                  "tried were skipped")

    def _train_examples(self, items: list[sources.SourceItem]) -> Iterator[tuple[str, dict]]:
        """Every item validation did not take (read only once validation is written)."""
        yield from self._generate_examples([it for it in items if it.key not in self._val_keys], "train")

    def _load(self, item: sources.SourceItem) -> tuple[sources.SourceItem, tuple | audio_io.BadAudio, list[str]]:
        """The item's first pass (run in a worker thread): audio of more than one clip is not kept."""
        s, notes = self._settings, []
        segment, minimum = int(s.segment_seconds * s.sample_rate), int(np.ceil(s.min_seconds * s.sample_rate))
        hold = segment + minimum - 1 if segment else sys.maxsize  # the longest audio split_segments leaves whole
        try:
            return item, sources.load_item(item, s.sample_rate, notes, hold=hold, block_seconds=s.block_seconds), notes
        except audio_io.BadAudio as e:
            return item, e, notes

    def _generate_examples(self, items: list[sources.SourceItem], split: str,
                           allow_empty: bool = False) -> Iterator[tuple[str, dict]]:
        s, report = self._settings, self._report
        sr = s.sample_rate
        segment, minimum = int(s.segment_seconds * sr), int(np.ceil(s.min_seconds * sr))
        first_id = next_id = self._next_id.get(split, 0)  # ids stay unique over a split's several calls
        bar = tqdm.tqdm(total=len(items), desc=f"preparing {split}", unit="item", disable=not self._progress)
        for item, loaded, notes in _ordered_map(self._load, items, s.workers):
            bar.update()
            report.items_read += 1
            if isinstance(loaded, audio_io.BadAudio):
                report.skip(item.key, loaded.reason, loaded.detail)
                continue
            for note in notes:
                report.note(item.key, note)
            first, caption, tags, attributes = loaded
            try:
                audio_io.check_level(first.frames, first.peak, sr, s.min_seconds, s.silence_db)
            except audio_io.BadAudio as e:
                report.skip(item.key, e.reason, e.detail)
                continue
            ranges = audio_io.split_segments(first.frames, segment, minimum)
            clips = first.clips(ranges)  # decodes again (block by block) unless the first pass kept the audio
            for k, (start, _) in enumerate(ranges):
                try:
                    piece = next(clips)
                except audio_io.BadAudio as e:  # the second read failed (the file changed): no later clip either
                    for rest in range(k, len(ranges)):
                        report.skip(item.key, e.reason, e.detail, segment=rest)
                    break
                piece = audio_io.limit_peak(piece, first.peak)  # the item's peak: its clips keep one gain
                try:
                    if len(ranges) > 1:
                        audio_io.check_audio(piece, sr, s.min_seconds, s.silence_db)
                except audio_io.BadAudio as e:
                    report.skip(item.key, e.reason, e.detail, segment=k)
                    continue
                report.wrote(split, len(piece) / sr)
                yield f"{item.key}#{k}", {
                    "audio": audio_io.to_pcm(piece, s.pcm), "caption": caption, "tags": list(tags),
                    "attributes": json.dumps(json_safe(attributes), sort_keys=True, default=str, allow_nan=False),
                    "source": item.key, "offset_s": start / sr, "id": next_id,
                }
                next_id += 1
                self._next_id[split] = next_id
        bar.close()
        if next_id == first_id and not allow_empty:
            raise EmptySplitError(f"split {split!r} has no usable examples: all {len(items)} items were skipped")


def dataset_dir(out_dir: str) -> str:
    return os.path.join(out_dir, DATASET_NAME, str(PreparedAudio.VERSION))


def find_prepared(path: str) -> str:
    """The prepared dataset directory for `path`: either that directory or a prepare --out folder."""
    if os.path.exists(os.path.join(path, "dataset_info.json")):
        return path
    found = sorted(glob.glob(os.path.join(path, DATASET_NAME, "*", "dataset_info.json")))
    if not found:
        raise FileNotFoundError(
            f"no prepared dataset in {path!r}; create one with "
            f"`python -m launch.prepare_data --source=... --out={path}`")
    return os.path.dirname(found[-1])


def held_out_split(path: str, split: str) -> str | None:
    """`split` when the prepared dataset at `path` has it; else None (a warning when one was asked for)."""
    if not split:
        return None
    if split not in tfds.builder_from_directory(find_prepared(path)).info.splits:
        logging.warning("no evaluation: %s has no split %r (config.data.eval_split)", path, split)
        return None
    return split


def host_split(path: str, split: str, sample_rate: int | None = None):
    """This host's share of a prepared split (`tfds.split_for_jax_process`) as a tf.data.Dataset of
    its examples in order; `sample_rate`, when given, must be the data's rate."""
    builder = tfds.builder_from_directory(find_prepared(path))
    rate = builder.info.metadata["settings"]["sample_rate"]
    if sample_rate is not None and rate != sample_rate:
        raise PrepareError(f"{path} was prepared at {rate} Hz, not the model's {sample_rate} Hz")
    if split not in builder.info.splits:
        raise PrepareError(f"{path} has no split {split!r} (it has {sorted(builder.info.splits)})")
    return builder.as_dataset(split=tfds.split_for_jax_process(split), shuffle_files=False)


def iter_clips(path: str, split: str = "train", sample_rate: int | None = None,
               limit: int | None = None) -> Iterator[dict[str, Any]]:
    """This host's share of a prepared split (its first `limit` examples), one clip at a time (so a split
    need not fit in memory) as dicts of float32 `audio`, `caption`, `tags` and `attributes` (a dict);
    `sample_rate`, when given, must be the data's rate (checked before the first clip is read)."""
    ds = host_split(path, split, sample_rate)
    if limit is not None:
        ds = ds.take(limit)
    return ({"audio": audio_io.from_pcm(ex["audio"]), "caption": ex["caption"].decode("utf-8"),
             "tags": [t.decode("utf-8") for t in ex["tags"]], "attributes": json.loads(ex["attributes"])}
            for ex in tfds.as_numpy(ds))


def read_clips(path: str, split: str = "train", sample_rate: int | None = None,
               limit: int | None = None) -> list[dict[str, Any]]:
    """`iter_clips` as a list."""
    return list(iter_clips(path, split, sample_rate, limit))


def load_report(out_dir: str) -> PrepareReport:
    with open(os.path.join(out_dir, REPORT_FILE), encoding="utf-8") as f:
        return PrepareReport.from_json(json.load(f))


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """TFDS's own progress bars off while ours runs (they would interleave with it), and its writer's
    in-memory buffer (1 GB by default: a whole split of serialized clips) bounded; beyond the bound it
    sorts the clips through temporary files into the same order."""
    tfds.disable_progress_bar()
    default, tfds_shuffle.MAX_MEM_BUFFER_SIZE = tfds_shuffle.MAX_MEM_BUFFER_SIZE, WRITER_BUFFER_BYTES
    try:
        yield
    finally:
        tfds.enable_progress_bar()
        tfds_shuffle.MAX_MEM_BUFFER_SIZE = default


def _writable_folder(out_dir: str) -> None:
    """--out as a folder this process can write, or a PrepareError before any decoding."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out={out_dir} is a file; name a folder")
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise PrepareError(f"--out={out_dir} is not a writable folder ({e.strerror or e})") from None


def prepare(settings: PrepareSettings, out_dir: str, *, overwrite: bool = False, progress: bool = True) -> PrepareReport:
    """Prepares `settings` into `out_dir` (reusing an identical earlier preparation); returns the report."""
    settings.validate()
    hide_gpus_from_tensorflow()
    existing = dataset_dir(out_dir)
    if os.path.exists(os.path.join(existing, "dataset_info.json")):
        stored = tfds.builder_from_directory(existing).info.metadata.get("settings")
        if stored == settings.fingerprint() and not overwrite:
            report = load_report(out_dir)
            report.reused = True
            return report
        if not overwrite:
            raise PrepareError(f"{out_dir} already holds a dataset prepared with other settings ({stored}); "
                             "choose another --out or pass --overwrite")
    if overwrite:
        shutil.rmtree(os.path.join(out_dir, DATASET_NAME), ignore_errors=True)
    _writable_folder(out_dir)
    for leftover in glob.glob(os.path.join(out_dir, DATASET_NAME, "**", "*incomplete*"), recursive=True):
        shutil.rmtree(leftover, ignore_errors=True)  # TFDS's working folders of a preparation that was killed
    start = time.perf_counter()
    try:
        items = list(sources.list_items(settings.source, input_path=settings.input, audio_dir=settings.audio_dir,
                                        num_clips=settings.num_clips, seed=settings.seed,
                                        clip_seconds=settings.clip_seconds))
    except (ValueError, OSError) as e:
        raise PrepareError(str(e)) from e
    if not items:
        raise PrepareError(f"source {settings.source!r} lists no audio in {settings.input!r}")
    report = PrepareReport()
    builder = PreparedAudio(settings=settings, items=items, report=report, data_dir=out_dir, progress=progress)
    try:
        with _quiet_tfds():
            builder.download_and_prepare(
                download_dir=os.path.join(out_dir, "downloads"),
                download_config=tfds.download.DownloadConfig(try_download_gcs=False),
            )
    except EmptySplitError as e:
        raise EmptySplitError(f"{e}; the reasons are in {os.path.join(out_dir, REPORT_FILE)}") from e
    finally:  # the report is written even when nothing usable was found
        report.elapsed_s = time.perf_counter() - start
        report.save(os.path.join(out_dir, REPORT_FILE))
    return report
