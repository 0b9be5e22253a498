"""Where every stage's batches come from, declared one way: `config.data.source` names a source of
this registry, `config.data.path` what it reads, `config.data.eval_split` its held-out split
("" = no evaluation). A task lists the sources it accepts and makes the batches of (source, split)
in `batches`; validation, the held-out split and the stream seeds are resolved here only.
"""
from __future__ import annotations

import abc
import json
import logging
import os
from typing import NamedTuple

import jax
import ml_collections

from melody_jax.training.config import require
from melody_jax.training.errors import ConfigError
from melody_jax.training.task import DataIterator, Task

TRAIN = "train"
HELD_OUT = ("validation", "test")  # the names data.eval_split may take
STREAM_OFFSET = 1_000_003  # apart from every seed a run uses: a split's stream never meets another's


class Source(NamedTuple):
    """`path`: what data.path must name ("" = the source reads no path). `held_out`: where a held-out
    split lives: "dataset" (a split of the prepared dataset), "records" (the cache's file of that
    split), "stream" (a synthetic stream of its own), "" (the source has none)."""
    path: str
    held_out: str


PREPARED = "a prepared dataset (`python -m launch.prepare_data`)"
SOURCES: dict[str, Source] = {
    "synthetic": Source("", "stream"),  # each stage's own rule, in its task module
    "prepared_audio": Source(PREPARED, "dataset"),
    "cached": Source("the cache folder `python -m launch.tokenize` writes", "records"),
    "frozen_models": Source(PREPARED, "dataset"),  # audio tokenised in the step by the upstream stages
    "codec": Source(PREPARED + " at the codec's rate", "dataset"),  # audio coded in the step by upstream.codec
    "upstream_audio": Source("", ""),  # data.path, or the upstream stage's dataset when empty
}


def check_data(config: ml_collections.ConfigDict, accepted: tuple[str, ...]) -> Source:
    """The one check of data.source, data.path and data.eval_split; a one-line ConfigError each."""
    d, stage = config.data, config.stage
    require(d.source in accepted, f"config.data.source={d.source!r}: stage {stage} reads one of {accepted}")
    source = SOURCES[d.source]
    require(bool(d.path) or not source.path,
            f"config.data.path is empty; data.source={d.source!r} needs {source.path}")
    allowed = HELD_OUT if source.held_out else ()
    require(d.eval_split in ("", *allowed), f"config.data.eval_split={d.eval_split!r}: data.source={d.source!r} "
            f"holds out one of {allowed} (\"\" = no evaluation)")
    return source


def split_index(split: str) -> int:
    """0 for the training split, 1 + its place in HELD_OUT for a held-out one."""
    return 0 if split == TRAIN else 1 + HELD_OUT.index(split)


def stream_seed(seed: int, split: str) -> int:
    """The seed of `split`'s stream: the run's seed for training, one far from it per held-out split."""
    return seed + STREAM_OFFSET * split_index(split)


MANIFEST = "manifest.json"  # in a cache folder: its splits' shard files and record counts (launch.tokenize)


def read_manifest(path: str) -> dict:
    """The manifest of the cache folder `path` ({} while there is none: no split finished yet)."""
    try:
        with open(os.path.join(path, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def cache_shards(path: str, split: str) -> list[tuple[str, int]]:
    """(shard file, records) of `split` in the cache folder `path`, as its manifest lists them."""
    splits = read_manifest(path).get("splits", {})
    if split not in splits:
        raise ConfigError(f"config.data.path={path!r} holds no finished {split!r} split of a cache "
                          f"(`python -m launch.tokenize` writes {MANIFEST}; it lists {sorted(splits)})")
    return [(os.path.join(path, s["file"]), int(s["records"])) for s in splits[split]["shards"]]


def held_out_split(config: ml_collections.ConfigDict) -> str | None:
    """data.eval_split when the source has it; None for no evaluation (a warning when one was asked for)."""
    d = config.data
    if not d.eval_split:
        return None
    kind = SOURCES[d.source].held_out
    if kind == "dataset":
        from data_pipeline.builder import held_out_split as dataset_split  # TensorFlow: only when used

        return dataset_split(d.path, d.eval_split)
    if kind == "records" and d.eval_split not in read_manifest(d.path).get("splits", {}):
        logging.warning("no evaluation: the cache %s has no %r split (config.data.eval_split)", d.path, d.eval_split)
        return None
    return d.eval_split


class SourcedTask(Task):
    """A stage whose training and held-out iterators are its `batches` of the training and eval splits."""

    sources: tuple[str, ...] = ()

    def check_data(self) -> Source:
        return check_data(self.config, self.sources)

    @abc.abstractmethod
    def batches(self, mesh: jax.sharding.Mesh, split: str) -> DataIterator:
        """Endless global batches of `split` from `config.data.source` (seeded by `stream_seed`)."""

    def train_iterator(self, mesh: jax.sharding.Mesh) -> DataIterator:
        return self.batches(mesh, TRAIN)

    def eval_iterator(self, mesh: jax.sharding.Mesh) -> DataIterator | None:
        split = held_out_split(self.config)
        return None if split is None else self.batches(mesh, split)


def prepared_audio(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, split: str, *, with_text: bool,
                   data: ml_collections.ConfigDict | None = None, other_segment: bool = False) -> DataIterator:
    """Crops of `split` of the prepared dataset at data.path (`data`: the config's data fields, changed);
    `other_segment`: each row also gets a crop from another part of its clip (data_pipeline/input.py)."""
    from data_pipeline.input import make_train_iterator  # TensorFlow: only when used

    return make_train_iterator(config.data if data is None else data, global_batch_size=config.train.batch_size,
                               mesh=mesh, seed=stream_seed(config.seed, split), split=split, with_text=with_text,
                               other_segment=other_segment)
