"""Cached stage inputs as TFRecords: written once by `launch.tokenize`, read by tf.data.

`launch.tokenize` runs the frozen MuLan + RVQ, SSL + k-means and VAE-GAN encoder once over a
dataset and writes, per clip, one `tf.train.Example` with `mulan_tokens` int64[12],
`semantic_tokens` int64[T] and `latents` float[L · 16] (row-major [L, 16]), so the semantic LM and
the DPD train without those models in their step. Each reader names the fields it needs.

Reading is deterministic and resumable from one number, the batches consumed: epoch e is this host's
records (every process_count-th) shuffled from (seed, e), and epochs follow each other unmixed. A
restore rebuilds epoch n·b // epoch_size and skips the rest in still-serialized records (no parsing).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
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


def write_records(path: str, arrays: Mapping[str, np.ndarray]) -> int:
    """Writes arrays [N, ...] (integers ≥ 0 or floats), one Example per row, to one file; returns N."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {len(v) for v in arrays.values()}
    if len(sizes) != 1 or any(v.ndim < 2 for v in arrays.values()):
        raise ValueError(f"need arrays [N, ...] with one N, got {({k: v.shape for k, v in arrays.items()})}")
    for name, a in arrays.items():
        if np.issubdtype(a.dtype, np.integer) and a.size and a.min() < 0:
            raise ValueError(f"{name} must be non-negative integers")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise ValueError(f"{name} holds non-finite values")
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(sizes.pop()):
            example = tf.train.Example(features=tf.train.Features(
                feature={k: _feature(v[i]) for k, v in arrays.items()}))
            writer.write(example.SerializeToString())
    return len(next(iter(arrays.values())))


def write_token_records(path: str, mulan_tokens: np.ndarray, semantic_tokens: np.ndarray) -> int:
    """Writes int [N, 12] MuLan and int [N, T] semantic tokens to one TFRecord file; returns N."""
    mulan, semantic = np.asarray(mulan_tokens), np.asarray(semantic_tokens)
    for name, a in (("mulan_tokens", mulan), ("semantic_tokens", semantic)):
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{name} must be non-negative integers, got dtype {a.dtype}")
    return write_records(path, {"mulan_tokens": mulan, "semantic_tokens": semantic})


class RecordIterator:
    """Endless global batches of the named `fields` (int32 codes, float32 values) from records.

    `pattern` is a file or glob. The first record's field sizes are checked against `fields`, and
    every batch's codes against their vocabulary, with errors naming the config setting.
    """

    def __init__(self, pattern: str, fields: Mapping[str, Field], *, global_batch_size: int,
                 mesh: jax.sharding.Mesh, seed: int, shuffle_buffer: int):
        hide_gpus_from_tensorflow()
        self.files = sorted(tf.io.gfile.glob(pattern))
        if not self.files:
            raise ConfigError(f"config.data.path={pattern!r} matches no files")
        self.fields, self.mesh, self.seed, self.shuffle_buffer = dict(fields), mesh, int(seed), shuffle_buffer
        rows = process_rows(global_batch_size)
        self.local_batch = rows.stop - rows.start
        self.features = {k: tf.io.FixedLenFeature([math.prod(f.shape)], tf.int64 if f.is_int else tf.float32)
                         for k, f in self.fields.items()}
        self.epoch_size = int(self._host_records().reduce(np.int64(0), lambda n, _: n + 1))
        if self.epoch_size == 0:
            raise ConfigError(f"config.data.path={pattern!r}: process {jax.process_index()} gets no records")
        record = tf.train.Example.FromString(next(iter(self._host_records().take(1))).numpy()).features.feature
        found = {k: (len(record[k].int64_list.value) or len(record[k].float_list.value)) if k in record else 0
                 for k in self.fields}
        expected = {k: math.prod(f.shape) for k, f in self.fields.items()}
        if found != expected:
            raise ConfigError(f"config.data.path={pattern!r} holds field sizes {found}, the config expects "
                              f"{expected}")
        self.batches = 0
        self._iterator = None

    def _host_records(self) -> tf.data.Dataset:
        return tf.data.TFRecordDataset(self.files).shard(jax.process_count(), jax.process_index())

    def _epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        return self._host_records().shuffle(self.shuffle_buffer, seed=self.seed * 1_000_003 + epoch)

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
