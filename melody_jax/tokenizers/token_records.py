"""Cached LM tokens as TFRecords: (MuLan tokens, semantic tokens) pairs, written once, read by tf.data.

`launch.tokenize` (to come) runs the frozen MuLan + RVQ and SSL + k-means stages once and writes
these, so the semantic LM trains without those models in its step. One `tf.train.Example` per clip:
`mulan_tokens` int64[12], `semantic_tokens` int64[T].

Reading is deterministic and resumable from one number, the batches consumed: epoch e is this host's
records (every process_count-th) shuffled from (seed, e), and epochs follow each other unmixed. A
restore rebuilds epoch n·b // epoch_size and skips the rest in still-serialized records (no parsing).
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
import tensorflow as tf

from data_pipeline.tf_setup import hide_gpus_from_tensorflow
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import host_to_global, process_rows


def _int64_feature(values: np.ndarray) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.tolist()))


def write_token_records(path: str, mulan_tokens: np.ndarray, semantic_tokens: np.ndarray) -> int:
    """Writes int [N, 12] MuLan and int [N, T] semantic tokens to one TFRecord file; returns N."""
    mulan, semantic = np.asarray(mulan_tokens), np.asarray(semantic_tokens)
    if mulan.ndim != 2 or semantic.ndim != 2 or len(mulan) != len(semantic):
        raise ValueError(f"need mulan_tokens [N, M] and semantic_tokens [N, T], got {mulan.shape} and {semantic.shape}")
    for name, a in (("mulan_tokens", mulan), ("semantic_tokens", semantic)):
        if not np.issubdtype(a.dtype, np.integer) or (a.size and a.min() < 0):
            raise ValueError(f"{name} must be non-negative integers, got dtype {a.dtype}")
    with tf.io.TFRecordWriter(path) as writer:
        for m, s in zip(mulan, semantic):
            example = tf.train.Example(features=tf.train.Features(feature={
                "mulan_tokens": _int64_feature(m), "semantic_tokens": _int64_feature(s)}))
            writer.write(example.SerializeToString())
    return len(mulan)


class TokenRecordIterator:
    """Endless global batches {mulan_tokens [B, M], semantic_tokens [B, T]} (int32) from records.

    `pattern` is a file or glob; `vocab_sizes` = (MuLan codebook, semantic vocabulary) bound the codes.
    """

    def __init__(self, pattern: str, *, global_batch_size: int, mesh: jax.sharding.Mesh, seed: int,
                 num_mulan_tokens: int, semantic_len: int, vocab_sizes: tuple[int, int], shuffle_buffer: int):
        hide_gpus_from_tensorflow()
        self.files = sorted(tf.io.gfile.glob(pattern))
        if not self.files:
            raise ConfigError(f"config.data.path={pattern!r} matches no files")
        self.mesh, self.seed, self.vocab_sizes, self.shuffle_buffer = mesh, int(seed), vocab_sizes, shuffle_buffer
        rows = process_rows(global_batch_size)
        self.local_batch = rows.stop - rows.start
        self.features = {"mulan_tokens": tf.io.FixedLenFeature([num_mulan_tokens], tf.int64),
                         "semantic_tokens": tf.io.FixedLenFeature([semantic_len], tf.int64)}
        self.epoch_size = int(self._host_records().reduce(np.int64(0), lambda n, _: n + 1))
        if self.epoch_size == 0:
            raise ConfigError(f"config.data.path={pattern!r}: process {jax.process_index()} gets no records")
        first = tf.io.parse_single_example(next(iter(self._host_records().take(1))),
                                           {k: tf.io.VarLenFeature(tf.int64) for k in self.features})
        found = {k: int(v.dense_shape[0]) for k, v in first.items()}
        expected = {"mulan_tokens": num_mulan_tokens, "semantic_tokens": semantic_len}
        if found != expected:
            raise ConfigError(f"config.data.path={pattern!r} holds token lengths {found}, the config expects "
                              f"{expected} (model.num_mulan_tokens, data.semantic_len)")
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

    def __iter__(self) -> TokenRecordIterator:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._iterator is None:
            self._iterator = self._dataset().as_numpy_iterator()
        local = {k: v.astype(np.int32) for k, v in next(self._iterator).items()}
        self.batches += 1
        for name, size in zip(("mulan_tokens", "semantic_tokens"), self.vocab_sizes):
            tokens = local[name]
            if tokens.min() < 0 or tokens.max() >= size:
                raise ValueError(f"{name} in {self.files[0]}…: codes must lie in [0, {size}), "
                                 f"found [{tokens.min()}, {tokens.max()}]")
        return host_to_global(local, self.mesh)

    def get_state(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def set_state(self, state: dict[str, Any]) -> None:
        self.batches = int(state["batches"])
        self._iterator = None
