"""One host's records of one split streamed into size-bounded shard files, resumable after a kill.

A shard is written as `<file>.partial` and committed by one rename; only then does the host's
progress file (`<split>/p<process>.progress.json`, replaced in one rename) list it, with the input
position just past its last record. A rerun (same settings) deletes what no progress lists, starts
a new shard at that position and so redoes only the shard a kill interrupted: nothing is written
twice or lost. The manifest (`manifest.json`, melody_jax/tasks/sources.py reads it) lists every
host's shards of each finished split.
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any

import numpy as np
import tensorflow as tf

from data_pipeline.token_records import serialized_rows
from melody_jax.tasks.sources import MANIFEST, read_manifest
from melody_jax.training.errors import ConfigError
from melody_jax.training.metrics import write_json_atomic


def progress_path(root: str, split: str, process: int) -> str:
    return os.path.join(root, split, f"p{process:05d}.progress.json")


def read_progress(root: str, split: str, process: int) -> dict[str, Any] | None:
    try:
        with open(progress_path(root, split, process), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def check_settings(root: str, split: str, process: int, settings: dict[str, Any]) -> None:
    """A ConfigError when this process's `split` in `root` was started with other settings."""
    progress = read_progress(root, split, process)
    if progress is not None and progress["settings"] != json.loads(json.dumps(settings)):  # as it reads back
        raise ConfigError(f"--out={root}: its {split!r} split was started with other settings "
                          f"({progress['settings']}, now {settings}); use a fresh --out")


class ShardWriter:
    """Serialized records → `root/<split>/p<process>-<k>.tfrecord`, a new shard once one holds `max_bytes`.

    `settings` (JSON) must equal those of the progress already there, if any. `position` is where
    the host's input resumes (None: its start); `done` says the split was finished before.
    """

    def __init__(self, root: str, split: str, process: int, max_bytes: int, settings: dict[str, Any]):
        self.root, self.split, self.process, self.max_bytes = root, split, process, max(1, int(max_bytes))
        os.makedirs(os.path.join(root, split), exist_ok=True)
        check_settings(root, split, process, settings)
        self.progress = read_progress(root, split, process) or {
            "settings": settings, "shards": [], "position": None, "done": False}
        kept = {os.path.join(root, s["file"]) for s in self.progress["shards"]}
        for path in glob.glob(os.path.join(root, split, f"p{process:05d}-*.tfrecord*")):
            if path not in kept:  # a shard a kill interrupted, or one committed but not yet listed
                os.remove(path)
        self._writer: tf.io.TFRecordWriter | None = None
        self._records = self._bytes = 0
        self._position: Any = self.progress["position"]

    @property
    def position(self) -> Any:
        return self.progress["position"]

    @property
    def done(self) -> bool:
        return bool(self.progress["done"])

    def _file(self) -> str:
        return f"{self.split}/p{self.process:05d}-{len(self.progress['shards']):05d}.tfrecord"

    def write(self, record: bytes, position: Any) -> None:
        """Appends one record; `position` is where the input resumes after it."""
        if self._writer is None:
            self._writer = tf.io.TFRecordWriter(os.path.join(self.root, self._file()) + ".partial")
        self._writer.write(record)
        self._records += 1
        self._bytes += len(record)
        self._position = position
        if self._bytes >= self.max_bytes:
            self.commit()

    def commit(self) -> None:
        """Closes the open shard (if any), renames it into place, then lists it in the progress file."""
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        name = self._file()
        os.replace(os.path.join(self.root, name) + ".partial", os.path.join(self.root, name))
        self.progress["shards"].append({"file": name, "records": self._records})
        self.progress["position"] = self._position
        self._records = self._bytes = 0
        write_json_atomic(progress_path(self.root, self.split, self.process), self.progress)

    def finish(self) -> None:
        self.commit()
        self.progress["done"] = True
        write_json_atomic(progress_path(self.root, self.split, self.process), self.progress)


def write_manifest(root: str, split: str, processes: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Adds `split` (every process's finished shards, from their progress files) to the manifest of
    `root`; returns the split's entry. Run by one process once all have finished the split."""
    shards, settings = [], None
    for p in range(processes):
        progress = read_progress(root, split, p)
        if progress is None or not progress["done"]:
            raise RuntimeError(f"process {p} has not finished the {split!r} split of {root}")
        shards += progress["shards"]
        settings = progress["settings"]
    entry = {"records": sum(s["records"] for s in shards), "shards": shards, "settings": settings, **(extra or {})}
    manifest = read_manifest(root)
    manifest.setdefault("splits", {})[split] = entry
    write_json_atomic(os.path.join(root, MANIFEST), manifest)
    return entry


def write_cache(root: str, split: str, arrays: dict[str, np.ndarray], max_bytes: int = 1 << 28) -> int:
    """Arrays [N, ...] (integers ≥ 0 or floats) written by this one process as `split` of the cache
    folder `root`, one record per row, shards and manifest included; returns N."""
    writer = ShardWriter(root, split, 0, max_bytes, {})
    for i, row in enumerate(serialized_rows(arrays)):
        writer.write(row, i + 1)
    writer.finish()
    return write_manifest(root, split, 1)["records"]
