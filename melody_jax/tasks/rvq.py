"""RVQ stage (DESIGN §4.3, §7): 12 × 1024 codebooks fitted by k-means per residual level on the
frozen MuLan's audio embeddings of the training set.

It runs through the generic loop honestly: one training step fits one level (the state's `step`
is the level), so `num_steps` = `num_quantizers`, every level is checkpointed (Orbax) and a rerun
resumes at the next level. Unfitted levels are zero codebooks, which quantize every residual to
zero, so the residual entering level `step` is simply what all levels leave. The iterator embeds the
training set once (each clip: mean of its `window_seconds` windows' embeddings, re-normalised to
the unit sphere where text embeddings live) and hands the same global [N, D] matrix to every step.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline.builder import read_clips
from data_pipeline.indexed import RepeatedBatch
from melody_jax.models.mulan import MuLan, embed_audio, l2_normalize, rvq_levels
from melody_jax.frozen.checks import require_upstream
from melody_jax.frozen.loader import Stage, load_stage
from melody_jax.frozen.stage_models import build_model
from melody_jax.tasks.sources import check_data
from melody_jax.nn.kmeans import kmeans
from melody_jax.nn.quantizers import perplexity
from melody_jax.training.config import positive, require
from melody_jax.training.sharding import batch_divisor, config_rules, host_to_global
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch, FittingTask


def windows(audio: np.ndarray, window: int) -> np.ndarray:
    """[n, window]: the clip's whole windows (the tail shorter than a window is dropped; a clip
    shorter than one window is zero-padded to one)."""
    n = max(1, len(audio) // window)
    return np.pad(audio[: n * window], (0, max(0, window - len(audio)))).reshape(n, window)


def clip_embeddings(model: MuLan, params, clips: list[np.ndarray], window: int, global_batch: int,
                    mesh: jax.sharding.Mesh) -> np.ndarray:
    """[len(clips), D]: per clip the re-normalised mean of its windows' audio embeddings.

    Each host passes its own clips; all hosts run the same number of (padded) global batches.
    """
    pieces = [windows(c, window) for c in clips]
    stacked = np.concatenate(pieces) if pieces else np.zeros((0, window), np.float32)
    local = global_batch // jax.process_count()
    batches = int(np.max(multihost_utils.process_allgather(np.array(math.ceil(len(stacked) / local)))))
    stacked = np.pad(stacked, ((0, batches * local - len(stacked)), (0, 0))).astype(np.float32)
    embed = jax.jit(lambda p, a: embed_audio(model, p, a), out_shardings=NamedSharding(mesh, PartitionSpec()))
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    out = []
    for i in range(batches):
        audio = host_to_global({"audio": stacked[i * local:(i + 1) * local]}, mesh)["audio"]
        out.append(np.asarray(embed(params, audio))[rows])
    out = np.concatenate(out)
    counts = np.array([len(p) for p in pieces])
    sums = np.zeros((len(clips), out.shape[1]), np.float32)
    np.add.at(sums, np.repeat(np.arange(len(clips)), counts), out[: counts.sum()])
    means = sums / np.maximum(counts, 1)[:, None]
    return np.asarray(l2_normalize(jnp.asarray(means)))


def embedding_batches(config, mulan: Stage, mesh: jax.sharding.Mesh) -> RepeatedBatch:
    """The training set's clip embeddings as one global [N, D] batch, every step (N: a multiple of the
    mesh's batch axes; at most that many − 1 clips per host are left out)."""
    c = config
    window = int(round(c.data.window_seconds * mulan.config.data.sample_rate))
    data = mulan.config.data.copy_and_resolve_references()
    data.path = c.data.path or data.path
    clips = [x["audio"] for x in read_clips(data.path, "train", data.sample_rate)]
    emb = clip_embeddings(mulan.model, mulan.params, clips, window, c.data.embed_batch_size, mesh)
    require(emb.shape[1] == c.model.embed_dim, f"config.model.embed_dim={c.model.embed_dim} but the MuLan in "
                                               f"{c.upstream.mulan} embeds to {emb.shape[1]}")
    per_host = max(1, batch_divisor(mesh) // jax.process_count())
    keep = int(np.min(multihost_utils.process_allgather(np.array(len(emb) // per_host * per_host))))
    require(keep > 0, f"the training set has fewer clips than the mesh's batch axes need ({per_host} per host)")
    return RepeatedBatch(host_to_global({"embeddings": emb[:keep]}, mesh))


def reconstruction(codebooks: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(quantized [N, D], mean squared error per vector, codes of every level [Q, N])."""
    codes, parts = rvq_levels(codebooks, x)
    quantized = parts.sum(0)
    return quantized, jnp.mean(jnp.sum((x - quantized) ** 2, -1)), codes


class RVQTask(FittingTask):
    name = "rvq"
    sources = ("upstream_audio",)

    def validate(self) -> None:
        c = self.config
        positive(c, "model.num_quantizers", "model.codebook_size", "model.kmeans_iters", "data.window_seconds",
                 "data.embed_batch_size")
        require(c.train.num_steps == c.model.num_quantizers,
                f"config.train.num_steps={c.train.num_steps} must equal model.num_quantizers={c.model.num_quantizers} "
                "(one step fits one level)")
        check_data(c, self.sources)
        require_upstream(c, "mulan")

    mulan: Stage | None = None  # the frozen MuLan stage of `upstream.mulan`, set by `setup`

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        if self.mulan is None:
            self.mulan = load_stage(self.config.upstream.mulan, "mulan", mesh, config_rules(self.config),
                                    field="config.upstream.mulan")

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        x = batch["embeddings"]
        quantized, error, _ = reconstruction(params["codebooks"], x)
        return error, {"cosine": jnp.mean(jnp.sum(x * l2_normalize(quantized), -1))}

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
        m = self.config.model
        x, codebooks = batch["embeddings"], state.params["codebooks"]
        residual = x - reconstruction(codebooks, x)[0]
        fitted = kmeans(residual, m.codebook_size, rng, m.kmeans_iters)
        codebooks = jax.lax.dynamic_update_index_in_dim(codebooks, fitted, state.step, 0)
        loss, metrics = self.loss({"codebooks": codebooks}, batch, rng)
        counts = jnp.zeros(m.codebook_size).at[reconstruction(codebooks, x)[2][state.step]].add(1.0)
        metrics = {**metrics, "loss": loss, "level": state.step + 1, "usage": jnp.mean(counts > 0),
                   "perplexity": perplexity(counts)}
        return state.replace(params={"codebooks": codebooks}), metrics

    def train_iterator(self, mesh):
        return embedding_batches(self.config, self.mulan, mesh)
