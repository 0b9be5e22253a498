"""Cached stage inputs as TFRecords: written once by `launch.tokenize`, read by tf.data.

`launch.tokenize` runs the frozen MuLan + RVQ, SSL + k-means and VAE-GAN encoder once over a
dataset and writes, per crop, one `tf.train.Example` with `mulan_tokens` int64[12],
`semantic_tokens` int64[T], `latents` float[L · 16] (row-major [L, 16]) and where the crop came from
(`clip_id`, `crop_start` in samples), into shard files a manifest lists (data_pipeline/tokenized.py),
so the semantic LM and the DPD train without those models in their step. Each reader names the
fields it needs.

Reading is deterministic and resumable from one number, the batches consumed: epoch e is this host's
records interleaved and shuffled from (seed, e), and epochs follow each other unmixed. A restore
rebuilds epoch n·b // epoch_size (its size from the manifest's counts) and skips the rest in
still-serialized records (no parsing).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import tensorflow as tf

from data_pipeline.tf_setup import hide_gpus_from_tensorflow
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import host_to_global, process_rows


class Field(NamedTuple):
    """What a reader expects of one record field: its shape, and for integer codes their bound."""

    shape: tuple[int, ...]
    vocab_size: int | None = None  # None: a float field

    @property
    def is_int(self) -> bool:
        return self.vocab_size is not None


def _feature(values: np.ndarray) -> tf.train.Feature:
    flat = values.reshape(-1)
    if np.issubdtype(values.dtype, np.integer):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=flat.tolist()))
    return tf.train.Feature(float_list=tf.train.FloatList(value=flat.astype(np.float32).tolist()))


def check_arrays(arrays: Mapping[str, np.ndarray]) -> int:
    """N of arrays [N, ...] that may be written: integers ≥ 0 or finite floats, one N; ValueError otherwise."""
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1 or any(v.ndim < 2 for v in arrays.values()):
        raise ValueError(f"need arrays [N, ...] with one N, got {({k: v.shape for k, v in arrays.items()})}")
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.integer) and a.size and a.min() < 0:
            raise ValueError(f"{name} must be non-negative integers")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{name} holds non-finite values")
    return sizes.pop()


def serialized_rows(arrays: Mapping[str, np.ndarray]) -> list[bytes]:
    """One serialized Example per row of arrays [N, ...] (checked by `check_arrays`)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    return [tf.train.Example(features=tf.train.Features(feature={k: _feature(v[i]) for k, v in arrays.items()}))
            .SerializeToString() for i in range(check_arrays(arrays))]


class RecordIterator:
    """Endless global batches of the named `fields` (int32 codes, float32 values) from cache shards.

    `shards` lists (file, records) as the cache's manifest does. With at least one file per process
    each host reads its own files (every process_count-th), else every host reads all and keeps
    every process_count-th record. An epoch interleaves the host's files in an order drawn from
    (seed, epoch), `CYCLE` at a time, then shuffles records in a buffer. The first record's field
    sizes are checked against `fields`, and every batch's codes against their vocabulary.
    """

    CYCLE = 8  # shard files read at once

    def __init__(self, shards: Sequence[tuple[str, int]], fields: Mapping[str, Field], *, global_batch_size: int,
                 mesh: jax.sharding.Mesh, seed: int, shuffle_buffer: int):
        hide_gpus_from_tensorflow()
        if not shards:
            raise ConfigError("config.data.path: the cache lists no shard files")
        n, i = jax.process_count(), jax.process_index()
        files, counts = [f for f, _ in shards], [c for _, c in shards]
        self.by_file = len(files) >= n
        self.files = files[i::n] if self.by_file else files
        total = sum(counts)
        self.epoch_size = sum(counts[i::n]) if self.by_file else total // n + int(i < total % n)
        if self.epoch_size == 0:
            raise ConfigError(f"config.data.path={os.path.dirname(files[0])!r}: process {i} gets no records")
        self.fields, self.mesh, self.seed, self.shuffle_buffer = dict(fields), mesh, int(seed), shuffle_buffer
        rows = process_rows(global_batch_size)
        self.local_batch = rows.stop - rows.start
        self.features = {k: tf.io.FixedLenFeature([math.prod(f.shape)], tf.int64 if f.is_int else tf.float32)
                         for k, f in self.fields.items()}
        first = next(iter(tf.data.TFRecordDataset(self.files[:1]).take(1))).numpy()
        record = tf.train.Example.FromString(first).features.feature
        found = {k: (len(record[k].int64_list.value) or len(record[k].float_list.value)) if k in record else 0
                 for k in self.fields}
        expected = {k: math.prod(f.shape) for k, f in self.fields.items()}
        if found != expected:
            raise ConfigError(f"config.data.path={os.path.dirname(files[0])!r} holds field sizes {found}, the config "
                              f"expects {expected}")
        self.batches = 0
        self._iterator = None

    def _epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        seed = self.seed * 1_000_003 + epoch
        files = tf.data.Dataset.from_tensor_slices(self.files).shuffle(len(self.files), seed=seed)
        records = files.interleave(tf.data.TFRecordDataset, cycle_length=min(self.CYCLE, len(self.files)),
                                   block_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if not self.by_file:  # the same order on every host: each keeps its every n-th record
            records = records.shard(jax.process_count(), jax.process_index())
        return records.shuffle(self.shuffle_buffer, seed=seed)

    def _dataset(self) -> tf.data.Dataset:
        epoch, offset = divmod(self.batches * self.local_batch, self.epoch_size)
        ds = tf.data.Dataset.range(epoch, 2**62).flat_map(self._epoch).skip(offset)
        ds = ds.batch(self.local_batch, drop_remainder=True)
        ds = ds.map(lambda rec: tf.io.parse_example(rec, self.features)).prefetch(2)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)

    def __iter__(self) -> RecordIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._iterator is None:
            self._iterator = self._dataset().as_numpy_iterator()
        raw = next(self._iterator)
        self.batches += 1
        local = {}
        for name, field in self.fields.items():
            values = raw[name].reshape((self.local_batch, *field.shape))
            if field.is_int:
                values = values.astype(np.int32)
                if values.min() < 0 or values.max() >= field.vocab_size:
                    raise ValueError(f"{name} in {self.files[0]}…: codes must lie in [0, {field.vocab_size}), "
                                     f"found [{values.min()}, {values.max()}]")
            local[name] = values
        return host_to_global(local, self.mesh)

    def get_state(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        self._iterator = None
