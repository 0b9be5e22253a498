"""Training input: per-host tf.data over a prepared dataset → random crops → global JAX batches.

Pipeline (per host, in order):
1. `tfds.split_for_jax_process` gives this host an even, disjoint share of the split's examples
   (as TFRecord file instructions).
2. Epoch e (e = 0, 1, ... forever): the host's shards in an order shuffled from (seed, e), read
   `cycle_length` at a time, then a `shuffle_buffer` shuffle seeded from (seed, e), then
   `enumerate` (position p within the epoch). Epochs never mix, and all of this happens on the
   still-serialized records, so skipping is cheap (no parsing, no crop).
3. Parse, convert to float32 in [-1, 1), crop `crop_seconds` at a start drawn statelessly from
   (seed, e, p) — shorter clips are zero-padded and `mask` marks real samples — batch the host's
   rows, prefetch. With `other_segment`, each row also gets `other_audio`: a crop of the same clip
   that does not overlap the first, drawn uniformly from (seed, e, p) among those that fit, or the
   first crop itself when none does (a clip shorter than two crops). With `min_segment_ratio` > 0,
   clips shorter than that share of the crop are filtered out in step 2, before `enumerate` (so they
   hold no position), which parses every record once more and makes an epoch's size known only by
   counting (once, on resume).
4. `__next__` turns the numeric arrays into global arrays sharded over the mesh's batch axes.

Resume scheme: the state is the number of examples this host has consumed (the same number on every
host) plus the seed and split. Because the stream is a pure function of (seed, epoch, position),
`set_state` rebuilds it at epoch n // epoch_size and skips n % epoch_size serialized records: the
next batch is exactly the one an uninterrupted run would have produced, and the state is a few
bytes of JSON. The cost of a restore is reading at most one epoch of this host's records (no
decoding). tf.data's own iterator checkpoints were not used: they store the shuffle buffer
(hundreds of MB of audio) and are tied to the TF version.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from data_pipeline.builder import find_prepared
from data_pipeline.tf_setup import hide_gpus_from_tensorflow
from melody_jax.training.errors import ConfigError, UserError
from melody_jax.training.sharding import batch_divisor, host_to_global

GLOBAL_KEYS = ("audio", "mask", "index")  # become global jax.Arrays; the rest stay host-local numpy
_STATE_VERSION = 1


class DataError(UserError, ValueError):
    """Prepared data that cannot be read as the config asks (damaged shards, another run's position)."""


def default_data_config() -> ml_collections.ConfigDict:
    """Fields of `config.data` that the training input reads (stage configs embed this)."""
    c = ml_collections.ConfigDict()
    c.path = ""  # a prepared dataset: the --out folder of `python -m launch.prepare_data`
    c.sample_rate = 24000  # must equal the prepared dataset's rate (checked)
    c.crop_seconds = 10.0  # length of every training example; shorter clips are padded + masked
    # Clips shorter than this share of the crop are skipped (their crops would be mostly padding); 0 = keep all.
    c.min_segment_ratio = 0.0
    c.shuffle_buffer = 256  # examples (serialized, so ~0.5 MB each for 10 s of int16 at 24 kHz)
    c.cycle_length = 4  # shards read concurrently per host
    c.prefetch_batches = 2
    return c


def _seed_for(seed: int, epoch: tf.Tensor) -> tf.Tensor:
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


class AudioBatchIterator:
    """Infinite iterator of training batches; see the module docstring for order and resume.

    `next(it)` returns a dict with global arrays
        audio  float32 [B, crop_samples]   in [-1, 1), zero after the clip's end
        mask   float32 [B, crop_samples]   1 where `audio` is real, 0 where it is padding
        index  int32   [B]                 the example's `id` in the prepared split
    and, unless `with_text=False`, `other_audio` (with `other_segment`: host-local float32 numpy
    [B_local, crop_samples], see the module docstring) and numpy object arrays of Python str holding
    this host's rows only (strings cannot be jax.Arrays): caption [B_local], tags [B_local] (", "-joined), attributes
    [B_local] (JSON). A text-conditioned task tokenises those into global arrays in its own
    iterator; audio-only stages pass `with_text=False` and get jax.Arrays only.
    """

    def __init__(self, data_config: Mapping[str, Any], *, global_batch_size: int, mesh: jax.sharding.Mesh,
                 seed: int, split: str = "train", with_text: bool = True, process_index: int | None = None,
                 process_count: int | None = None, other_segment: bool = False):
        hide_gpus_from_tensorflow()
        self.other_segment = other_segment
        cfg = dict(default_data_config().to_dict(), **dict(data_config.items()))
        self.mesh = mesh
        self.seed = int(seed)
        self.split = split
        self.with_text = with_text
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch_size % self.process_count:
            raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by {self.process_count} processes")
        if global_batch_size % batch_divisor(mesh):
            raise ConfigError(f"train.batch_size={global_batch_size} is not divisible by the mesh's batch axes "
                              f"(data×fsdp = {batch_divisor(mesh)})")
        if cfg["crop_seconds"] <= 0:
            raise ConfigError(f"config.data.crop_seconds must be > 0, got {cfg['crop_seconds']}")
        if not 0.0 <= cfg["min_segment_ratio"] <= 1.0:
            raise ConfigError(f"config.data.min_segment_ratio={cfg['min_segment_ratio']} must lie in [0, 1]")
        if cfg["shuffle_buffer"] < 1 or cfg["cycle_length"] < 1:
            raise ConfigError("config.data.shuffle_buffer and config.data.cycle_length must be >= 1")
        self.local_batch_size = global_batch_size // self.process_count
        self._cfg = cfg
        try:
            self._builder = tfds.builder_from_directory(find_prepared(cfg["path"]))
        except FileNotFoundError as e:
            raise ConfigError(f"config.data.path={cfg['path']!r}: {e}") from e
        rate = self._builder.info.metadata["settings"]["sample_rate"]
        if rate != cfg["sample_rate"]:
            raise ConfigError(f"config.data.sample_rate={cfg['sample_rate']} but {cfg['path']} was prepared at {rate} Hz")
        self.crop_samples = int(round(cfg["crop_seconds"] * rate))
        if split not in self._builder.info.splits:
            raise ConfigError(f"split {split!r} is not in {cfg['path']} (it has {list(self._builder.info.splits)})")
        host_split = tfds.split_for_jax_process(split, process_index=self.process_index,
                                                process_count=self.process_count)
        self._files = self._builder.info.splits[host_split].file_instructions
        self._min_samples = int(np.ceil(cfg["min_segment_ratio"] * self.crop_samples))
        self._records_per_epoch = sum(f.take for f in self._files)
        if not self._records_per_epoch:
            raise ConfigError(f"config.data.path={cfg['path']!r}: process {self.process_index} of "
                              f"{self.process_count} gets no examples of split {split!r}")
        self._kept: int | None = None if self._min_samples else self._records_per_epoch
        self._consumed = 0
        self._iterator = None

    @property
    def examples_per_epoch(self) -> int:
        """This host's examples in an epoch: with `min_segment_ratio`, the clips long enough, counted once
        by reading the host's share (only when asked: on resume or by a caller that needs it)."""
        if self._kept is None:
            count = self._epoch(tf.constant(0, tf.int64)).reduce(tf.constant(0, tf.int64), lambda n, _: n + 1)
            self._kept = int(count)
            if not self._kept:
                raise ConfigError(f"config.data.min_segment_ratio={self._cfg['min_segment_ratio']}: no clip of "
                                  f"process {self.process_index}'s share of split {self.split!r} in "
                                  f"{self._cfg['path']} is {self._min_samples} samples or longer")
        return self._kept

    # --- state -----------------------------------------------------------------------------
    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position: identical on every host."""
        return {"version": _STATE_VERSION, "examples_consumed": self._consumed, "seed": self.seed, "split": self.split}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continue after `state` (from get_state); the next batch is the one that followed it."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state has version {state.get('version')}, expected {_STATE_VERSION}")
        if state["seed"] != self.seed or state["split"] != self.split:
            raise DataError(f"data iterator state is for seed={state['seed']} split={state['split']!r}, "
                             f"this iterator has seed={self.seed} split={self.split!r}")
        self._consumed = int(state["examples_consumed"])
        self._iterator = None

    # --- pipeline --------------------------------------------------------------------------
    def _epoch(self, epoch: tf.Tensor) -> tf.data.Dataset:
        files = self._files
        names = tf.constant([f.filename for f in files])
        skips = tf.constant([f.skip for f in files], tf.int64)
        takes = tf.constant([f.take for f in files], tf.int64)
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(files)), seed=tf.stack([_seed_for(self.seed, epoch), tf.constant(7, tf.int64)]))
        shards = tf.data.Dataset.from_tensor_slices((tf.gather(names, order), tf.gather(skips, order),
                                                     tf.gather(takes, order)))
        records = shards.interleave(
            lambda name, skip, take: tf.data.TFRecordDataset(name).skip(skip).take(take),
            cycle_length=min(self._cfg["cycle_length"], len(files)), block_length=1,
            num_parallel_calls=min(self._cfg["cycle_length"], len(files)), deterministic=True)
        records = records.shuffle(self._cfg["shuffle_buffer"], seed=_seed_for(self.seed, epoch))
        if self._min_samples:  # before `enumerate`, so positions (and resuming) count the kept clips only
            records = records.filter(lambda rec: self._num_samples(rec) >= self._min_samples)
        return records.enumerate().map(lambda pos, rec: (epoch, pos, rec))

    def _num_samples(self, record: tf.Tensor) -> tf.Tensor:
        return tf.shape(self._builder.info.features.deserialize_example(record)["audio"], out_type=tf.int64)[0]

    def _parse_and_crop(self, epoch: tf.Tensor, pos: tf.Tensor, record: tf.Tensor) -> dict[str, tf.Tensor]:
        ex = self._builder.info.features.deserialize_example(record)
        audio = ex["audio"]
        if audio.dtype == tf.int16:
            audio = tf.cast(audio, tf.float32) / 32768.0
        n = tf.shape(audio, out_type=tf.int64)[0]
        crop = self.crop_samples
        start = tf.random.stateless_uniform(
            [], seed=tf.stack([_seed_for(self.seed, epoch), pos]), minval=0,
            maxval=tf.maximum(n - crop, 0) + 1, dtype=tf.int64)
        piece = audio[start:start + crop]
        valid = tf.shape(piece)[0]
        other = {}
        if self.other_segment:
            before, after = tf.maximum(start - crop + 1, 0), tf.maximum(n - 2 * crop - start + 1, 0)
            draw = tf.random.stateless_uniform([], seed=tf.stack([-1 - _seed_for(self.seed, epoch), pos]), minval=0,
                                               maxval=tf.maximum(before + after, 1), dtype=tf.int64)
            second = tf.where(before + after == 0, start, tf.where(draw < before, draw, start + crop + draw - before))
            other = {"other_audio": tf.pad(audio[second:second + crop], [[0, crop - valid]])}
        return {
            **other,
            "audio": tf.pad(piece, [[0, crop - valid]]),
            "mask": tf.sequence_mask(valid, crop, dtype=tf.float32),
            "index": tf.cast(ex["id"], tf.int32),
            "caption": ex["caption"],
            "tags": tf.strings.reduce_join(ex["tags"], separator=", "),
            "attributes": ex["attributes"],
        }

    def _dataset(self) -> tf.data.Dataset:
        epoch0, offset = divmod(self._consumed, self.examples_per_epoch) if self._consumed else (0, 0)
        ds = tf.data.Dataset.range(epoch0, 2**62).flat_map(self._epoch).skip(offset)
        ds = ds.map(self._parse_and_crop, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(self.local_batch_size, drop_remainder=True).prefetch(self._cfg["prefetch_batches"])
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options)

    # --- iteration -------------------------------------------------------------------------
    def next_local(self) -> dict[str, np.ndarray]:
        """This host's rows of the next batch, all numpy (what `__next__` makes global)."""
        if self._iterator is None:
            self._iterator = self._dataset().as_numpy_iterator()
        try:
            batch = next(self._iterator)
        except (tf.errors.NotFoundError, tf.errors.DataLossError) as e:  # a shard deleted or truncated since
            raise DataError(f"the prepared dataset at {self._cfg['path']} is damaged ({e.message.splitlines()[0]}); "
                            "prepare it again with `python -m launch.prepare_data`") from None
        self._consumed += self.local_batch_size
        for key in ("caption", "tags", "attributes"):
            batch[key] = np.array([b.decode("utf-8") for b in batch[key]], dtype=object)
        return batch

    def __iter__(self) -> AudioBatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        local = self.next_local()
        out: dict[str, Any] = host_to_global({k: local[k] for k in GLOBAL_KEYS}, self.mesh)
        if self.with_text:
            out.update({k: v for k, v in local.items() if k not in GLOBAL_KEYS})
        return out


def make_train_iterator(data_config: Mapping[str, Any], *, global_batch_size: int, mesh: jax.sharding.Mesh,
                        seed: int, split: str = "train", with_text: bool = True, process_index: int | None = None,
                        process_count: int | None = None, other_segment: bool = False) -> AudioBatchIterator:
    """The training input of every stage; `process_index/count` default to JAX's (tests inject them)."""
    return AudioBatchIterator(data_config, global_batch_size=global_batch_size, mesh=mesh, seed=seed, split=split,
                              with_text=with_text, process_index=process_index, process_count=process_count,
                              other_segment=other_segment)
