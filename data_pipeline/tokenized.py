"""A prepared dataset run through the frozen stages once: the cached records of the semantic LM and DPD.

What `launch.tokenize` (and the demo) write, as one job over every host: each host reads its own
share of each split (`tfds.split_for_jax_process`), cuts crops of its clips (`CropSpec`), and the
frozen VAE encoder, SSL + k-means and MuLan + RVQ run as one jitted function on the whole mesh (the
global batch sharded over every device, each host giving its rows). Each host streams its crops'
latents, semantic tokens, MuLan audio tokens and the MuLan text tokens of their clip's caption (the
prefix a prompt gives at sampling time), or those of them a cache keeps (`FIELDS`), into its own
size-bounded shards (data_pipeline/record_shards.py: memory stays flat, a killed job resumes at its
last committed shard), and process 0 lists every
shard in the cache folder's manifest once all hosts have finished a split (`data.source=cached`,
`data.path` the folder, `data.eval_split` a held-out split: melody_jax/tasks/sources.py).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from data_pipeline.audio_io import from_pcm
from data_pipeline.builder import host_split
from data_pipeline.record_shards import ShardWriter, check_settings, write_manifest
from data_pipeline.token_records import serialized_rows
from melody_jax.frozen.mulan import FrozenMuLan
from melody_jax.frozen.semantic import SemanticTokenizer
from melody_jax.frozen.vae import FrozenVAE
from melody_jax.tasks.mulan import pick_texts
from melody_jax.tasks.sources import read_manifest, split_index
from melody_jax.text.byte_tokenizer import tokenize as text_tokenize
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import BATCH_AXES, Rules, activate, batch_divisor, host_to_global

CROP_MODES = ("fixed", "sliding", "random")
# The model fields a record can hold (besides where its crop came from); a cache started with others is refused.
# The DPD reads latents and semantic tokens, the semantic LM the tokens alone: a cache keeps the fields its stage
# reads, and the stages' jitted pass computes only those (the LM's cache then runs no VAE encoder and stores no
# latents: 30 KB of each 1.92-s crop's 31 KB record at the tiny preset).
FIELDS = ("latents", "semantic_tokens", "mulan_tokens", "mulan_text_tokens")


def checked_fields(fields: Sequence[str]) -> tuple[str, ...]:
    """`fields` in FIELDS' order (the same selection is the same cache), or a ConfigError naming FIELDS."""
    if not fields or not set(fields) <= set(FIELDS):
        raise ConfigError(f"--fields={','.join(fields)}: need one or more of {', '.join(FIELDS)}")
    return tuple(f for f in FIELDS if f in fields)


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """Where crops of `seconds` start in a clip: "fixed" whole non-overlapping crops; "sliding" one
    every `hop_seconds` (less than `seconds`: they overlap); "random" `per_clip` uniform starts drawn
    from (seed, split, clip id). A clip shorter than one crop gives none."""

    seconds: float
    mode: str = "fixed"
    hop_seconds: float = 0.0
    per_clip: int = 1
    seed: int = 0

    def check(self) -> None:
        if self.mode not in CROP_MODES:
            raise ConfigError(f"--crops={self.mode!r} must be one of {CROP_MODES}")
        if not (np.isfinite(self.seconds) and self.seconds > 0):
            raise ConfigError(f"--crop_seconds={self.seconds} must be a positive number of seconds")
        if self.mode == "sliding" and not (np.isfinite(self.hop_seconds) and self.hop_seconds > 0):
            raise ConfigError(f"--crop_hop_seconds={self.hop_seconds} must be > 0 for --crops=sliding")
        if self.mode == "random" and self.per_clip < 1:
            raise ConfigError(f"--crops_per_clip={self.per_clip} must be >= 1 for --crops=random")

    def starts(self, length: int, rate: int, split: str, clip_id: int) -> np.ndarray:
        """Start samples of the crops of a clip of `length` samples."""
        crop = int(round(self.seconds * rate))
        if length < crop:
            return np.zeros(0, np.int64)
        if self.mode == "random":
            rng = np.random.default_rng([self.seed, split_index(split), clip_id])
            return rng.integers(0, length - crop + 1, self.per_clip, dtype=np.int64)
        hop = crop if self.mode == "fixed" else max(1, int(round(self.hop_seconds * rate)))
        return np.arange(0, length - crop + 1, hop, dtype=np.int64)


def clip_text(example: dict[str, Any]) -> str:
    """A prepared clip's text for MuLan: its caption, or its tags when it has none (MuLan's `pick_texts`)."""
    tags = ", ".join(t.decode("utf-8") for t in example["tags"])
    return pick_texts([example["caption"].decode("utf-8")], [tags], [True])[0]


def host_crops(data_path: str, split: str, rate: int, spec: CropSpec, position: tuple[int, int] | None
               ) -> Iterator[tuple[tuple[int, int], int, int, np.ndarray, str]]:
    """(position after it, clip id, start, audio [crop], clip text) of each crop of this host's share of
    `split` in order, from `position` = (clip, crop) of that share on (None: its start). One clip in memory."""
    clip, first = position or (0, 0)
    crop = int(round(spec.seconds * rate))
    for example in host_split(data_path, split, rate).skip(clip).as_numpy_iterator():
        audio, clip_id, text = from_pcm(example["audio"]), int(example["id"]), clip_text(example)
        starts = spec.starts(len(audio), rate, split, clip_id)
        for k in range(first, len(starts)):
            after = (clip, k + 1) if k + 1 < len(starts) else (clip + 1, 0)
            yield after, clip_id, int(starts[k]), audio[starts[k]:starts[k] + crop], text
        clip, first = clip + 1, 0


class FrozenStages:
    """The three frozen stages as one jitted function of a global audio batch on `mesh`.

    `stage_dirs` names the directories of "vae_gan", "ssl", "kmeans", "mulan" and "rvq".
    """

    def __init__(self, stage_dirs: dict[str, str], mesh: jax.sharding.Mesh, rules: Rules):
        d = self.dirs = {k: os.path.abspath(v) for k, v in stage_dirs.items()}
        self.vae = FrozenVAE.load(d["vae_gan"], mesh, rules)
        self.tokenizer = SemanticTokenizer.load(d["kmeans"], d["ssl"], mesh, rules)
        self.mulan = FrozenMuLan.load(d["mulan"], d["rvq"], mesh, rules)
        if self.tokenizer.sample_rate != self.vae.sample_rate:
            raise ConfigError(f"the ssl stage works at {self.tokenizer.sample_rate} Hz, the vae_gan at "
                              f"{self.vae.sample_rate} Hz")
        self.mesh, self.rules = mesh, rules
        self.params = {"vae": self.vae.params, "ssl": self.tokenizer.ssl_params,
                       "centroids": self.tokenizer.centroids, "mulan": self.mulan.params}
        self._step = jax.jit(self._outputs, static_argnames="fields")

    def _outputs(self, params: Any, inputs: dict[str, jax.Array], fields: tuple[str, ...]) -> dict[str, jax.Array]:
        audio = inputs["audio"]
        fn = {"latents": lambda: self.vae.encode_fn(params["vae"], audio),
              "semantic_tokens": lambda: self.tokenizer.fn(params["ssl"], params["centroids"], audio),
              "mulan_tokens": lambda: self.mulan.audio_tokens_fn(params["mulan"], audio),
              "mulan_text_tokens": lambda: self.mulan.text_tokens_fn(params["mulan"], inputs["text"],
                                                                     inputs["text_mask"])}
        return {k: fn[k]() for k in fields}

    def __call__(self, local_audio: np.ndarray, texts: list[str],
                 fields: tuple[str, ...] = FIELDS) -> dict[str, np.ndarray]:
        """This host's rows: audio [b, crop] and their clips' texts (every host b of them) → this host's rows
        of each of `fields`."""
        text, text_mask = text_tokenize(texts, self.mulan.max_text_length)
        with activate(self.mesh, self.rules):
            inputs = host_to_global({"audio": local_audio, "text": text, "text_mask": text_mask}, self.mesh)
            out = self._step(self.params, inputs, fields=tuple(fields))
            local = multihost_utils.global_array_to_host_local_array(out, self.mesh, PartitionSpec(BATCH_AXES))
        return {k: np.asarray(v) for k, v in local.items()}


def _tokenize_split(stages: FrozenStages, data_path: str, split: str, out: str, spec: CropSpec, batch_size: int,
                    shard_bytes: int, settings: dict[str, Any], fields: tuple[str, ...]) -> int:
    """Streams this host's crops of `split` through the stages into its shards; returns its records."""
    rate = stages.vae.sample_rate
    crop = int(round(spec.seconds * rate))
    writer = ShardWriter(out, split, jax.process_index(), shard_bytes, settings)
    position = tuple(writer.position) if writer.position else None
    crops = iter(()) if writer.done else host_crops(data_path, split, rate, spec, position)
    local = batch_size // jax.process_count()
    while True:
        chunk = [c for _, c in zip(range(local), crops)]
        if not multihost_utils.process_allgather(np.array(len(chunk))).any():  # every host has finished
            break
        audio = np.zeros((local, crop), np.float32)  # one shape: one compilation; hosts done give zeros
        texts = [""] * local
        for i, (_, _, _, a, text) in enumerate(chunk):
            audio[i], texts[i] = a, text
        outputs = stages(audio, texts, fields)
        if chunk:
            where = {"clip_id": np.array([c[1] for c in chunk], np.int64)[:, None],
                     "crop_start": np.array([c[2] for c in chunk], np.int64)[:, None]}
            rows = serialized_rows({**{k: v[:len(chunk)] for k, v in outputs.items()}, **where})
            for row, (after, *_) in zip(rows, chunk):
                writer.write(row, after)
    writer.finish()
    return sum(s["records"] for s in writer.progress["shards"])


def tokenize_dataset(data_path: str, splits: list[str], out: str, stages: FrozenStages, spec: CropSpec,
                     batch_size: int, *, shard_mb: float = 256.0,
                     fields: tuple[str, ...] = FIELDS) -> dict[str, dict[str, Any]]:
    """Runs the frozen stages over each of the prepared dataset's `splits` on their mesh (every host
    calls it alike) and writes every crop's records into shards of about `shard_mb` MB under `out`;
    returns each split's manifest entry. A rerun resumes; a finished split is not redone.

    `batch_size` is the global batch (a multiple of the mesh's devices and of the processes); `fields`, the
    model fields each record holds (some of FIELDS, in any order).
    """
    spec.check()
    fields = checked_fields(fields)
    devices = batch_divisor(stages.mesh)
    if batch_size < 1 or batch_size % devices or batch_size % jax.process_count():
        raise ConfigError(f"--batch_size={batch_size} must be a positive multiple of the {devices} devices "
                          f"and {jax.process_count()} processes")
    settings = {"crops": dataclasses.asdict(spec), "processes": jax.process_count(),
                "data": os.path.abspath(data_path), "stages": stages.dirs, "fields": list(fields)}
    for split in splits:  # before any work: a foreign cache is refused, a finished one returned
        check_settings(out, split, jax.process_index(), settings)
    finished = read_manifest(out).get("splits", {})
    if all(split in finished for split in splits):
        return {split: finished[split] for split in splits}
    rate, hops = stages.vae.sample_rate, (stages.tokenizer.hop, stages.vae.hop)
    crop = int(round(spec.seconds * rate))
    if crop % hops[0] or crop % hops[1]:
        raise ConfigError(f"--crop_seconds={spec.seconds}: {crop} samples is not a whole number of semantic "
                          f"tokens ({hops[0]} samples) and latent frames ({hops[1]} samples)")
    shapes = {"latents": [crop // hops[1], stages.vae.latent_dim], "semantic_tokens": [crop // hops[0]],
              "mulan_tokens": [stages.mulan.num_tokens], "mulan_text_tokens": [stages.mulan.num_tokens]}
    written = {}
    for split in splits:
        mine = _tokenize_split(stages, data_path, split, out, spec, batch_size, int(shard_mb * 2**20), settings,
                               fields)
        if not multihost_utils.process_allgather(np.array(mine)).sum():
            raise ConfigError(f"--crop_seconds={spec.seconds}: no clip of the {split!r} split is {crop} samples long")
        if jax.process_index() == 0:
            write_manifest(out, split, jax.process_count(), {"fields": {k: shapes[k] for k in fields},
                                                             "sample_rate": rate})
        multihost_utils.sync_global_devices(f"tokenize manifest {split}")
        written[split] = read_manifest(out)["splits"][split]
    return written
