"""RVQ stage (DESIGN §4.3, §7): 12 × 1024 codebooks fitted by k-means per residual level on the
frozen MuLan's audio embeddings of the training set.

It runs through the generic loop honestly: one training step fits one level (the state's `step`
is the level), so `num_steps` = `num_quantizers`, every level is checkpointed (Orbax) and a rerun
resumes at the next level. Unfitted levels are zero codebooks, which quantize every residual to
zero, so the residual entering level `step` is simply what all levels leave. The iterator streams the
training set's audio once, clip by clip, into one embedding per clip (the mean of its `window_seconds`
windows' embeddings over their valid samples, re-normalised to the unit sphere where text embeddings
live): D floats a clip stay in host memory, the audio does not. Each level's k-means streams over
chunks of `data.embed_batch_size` embeddings (k-means++ on the first `data.init_batches` chunks, 0 =
all; then exact Lloyd passes), so the devices hold one chunk at a time.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from data_pipeline.builder import iter_clips
from melody_jax.models.mulan import MuLan, embed_audio, l2_normalize, rvq_levels
from melody_jax.frozen.checks import require_upstream
from melody_jax.frozen.loader import Stage, load_stage
from melody_jax.frozen.stage_models import build_model
from melody_jax.tasks.sources import check_data
from melody_jax.nn.kmeans import Chunks, fit_kmeans_stream
from melody_jax.nn.quantizers import perplexity
from melody_jax.training.config import non_negative, positive, require
from melody_jax.training.sharding import batch_divisor, config_rules, host_to_global
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch, FittingTask, Passes


def windows(audio: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """([n, window] windows, [n, window] sample masks): the clip's whole windows (the tail shorter than a
    window is dropped; a clip shorter than one window is one zero-padded window, its padding masked)."""
    n = max(1, len(audio) // window)
    kept = audio[: n * window]
    pad = (0, n * window - len(kept))
    return np.pad(kept, pad).reshape(n, window), np.pad(np.ones(len(kept), np.float32), pad).reshape(n, window)


def clip_embeddings(model: MuLan, params, clips: Iterable[np.ndarray], window: int, global_batch: int,
                    mesh: jax.sharding.Mesh) -> np.ndarray:
    """[number of clips, D]: per clip the re-normalised mean of its windows' audio embeddings (each over its
    valid samples). Streamed: clips are read as the windows are embedded, one global batch at a time.

    Each host passes its own clips; all hosts run the same number of global batches (one with no windows
    left adds silent, unused rows).
    """
    local = global_batch // jax.process_count()
    embed = jax.jit(lambda p, a, m: embed_audio(model, p, a, m), out_shardings=NamedSharding(mesh, PartitionSpec()))
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    stream = itertools.chain.from_iterable(zip(itertools.repeat(i), *windows(c, window)) for i, c in enumerate(clips))
    sums: list[np.ndarray] = []
    counts: list[int] = []
    while True:
        batch = list(itertools.islice(stream, local))
        if not np.max(multihost_utils.process_allgather(np.array(len(batch)))):
            break
        audio, mask = np.zeros((2, local, window), np.float32)
        for row, (_, w, m) in enumerate(batch):
            audio[row], mask[row] = w, m
        out = np.asarray(embed(params, *host_to_global({"audio": audio, "mask": mask}, mesh).values()))[rows]
        for (owner, _, _), emb in zip(batch, out):
            if owner == len(sums):
                sums.append(np.zeros_like(emb))
                counts.append(0)
            sums[owner] += emb
            counts[owner] += 1
    means = np.stack(sums) / np.array(counts, np.float32)[:, None] if sums else np.zeros((0, 0), np.float32)
    return np.asarray(l2_normalize(jnp.asarray(means)))


class EmbeddingChunks(Passes):
    """The clip embeddings (this host's [N, D] in host memory: D floats a clip, the audio is not kept) as
    global chunks of `rows` embeddings, weight 0 on the rows that pad the last chunk; `next()` hands out a
    fresh pass (the same chunks every time), so the fit holds one chunk on the devices at a time."""

    def __init__(self, embeddings: np.ndarray, rows: int, mesh: jax.sharding.Mesh):
        require(rows % batch_divisor(mesh) == 0, f"config.data.embed_batch_size={rows} is not divisible by the "
                                                 f"mesh's batch axes (data×fsdp = {batch_divisor(mesh)})")
        self.local = rows // jax.process_count()
        self.embeddings, self.mesh = embeddings, mesh
        sizes = multihost_utils.process_allgather(np.array(math.ceil(len(embeddings) / self.local)))
        self.num_chunks = int(np.max(sizes))
        require(self.num_chunks > 0, "the training set has no clips to fit the RVQ on")

    def chunks(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        for i in range(self.num_chunks):
            x = self.embeddings[i * self.local:(i + 1) * self.local]
            w = np.ones(len(x), np.float32)
            pad = self.local - len(x)
            batch = host_to_global({"x": np.pad(x, ((0, pad), (0, 0))), "w": np.pad(w, (0, pad))}, self.mesh)
            yield batch["x"], batch["w"]


def embedding_chunks(config, mulan: Stage, mesh: jax.sharding.Mesh) -> EmbeddingChunks:
    """The training set's clip embeddings, streamed from the prepared audio once."""
    c = config
    window = int(round(c.data.window_seconds * mulan.config.data.sample_rate))
    data = mulan.config.data.copy_and_resolve_references()
    data.path = c.data.path or data.path
    clips = (x["audio"] for x in iter_clips(data.path, "train", data.sample_rate))
    emb = clip_embeddings(mulan.model, mulan.params, clips, window, c.data.embed_batch_size, mesh)
    require(len(emb) == 0 or emb.shape[1] == c.model.embed_dim,
            f"config.model.embed_dim={c.model.embed_dim} but the MuLan in {c.upstream.mulan} embeds to {emb.shape[1]}")
    return EmbeddingChunks(emb.reshape(len(emb), c.model.embed_dim), c.data.embed_batch_size, mesh)


@jax.jit
def _residual(codebooks: jax.Array, x: jax.Array) -> jax.Array:
    return x - reconstruction(codebooks, x)[0]


@jax.jit
def _level_sums(codebooks: jax.Array, x: jax.Array, w: jax.Array, level: jax.Array) -> dict[str, jax.Array]:
    quantized, _, codes = reconstruction(codebooks, x)
    k = codebooks.shape[1]
    return {"error": jnp.sum(w * jnp.sum((x - quantized) ** 2, -1)), "cosine": jnp.sum(w * jnp.sum(
        x * l2_normalize(quantized), -1)), "counts": jnp.einsum("n,nk->k", w, jax.nn.one_hot(codes[level], k)),
            "rows": w.sum()}


def fit_level(chunks: Chunks, codebooks: jax.Array, level: int, key: jax.Array, *, iters: int,
              init_chunks: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(codebooks with `level` fitted by k-means on the residuals all lower levels leave, the pass's sums
    of squared error, cosine, level-`level` code counts and rows), streamed over the chunks."""
    def residuals() -> Iterator[tuple[jax.Array, jax.Array]]:
        return ((_residual(codebooks, x), w) for x, w in chunks())

    fit = fit_kmeans_stream(residuals, codebooks.shape[1], key, iters=iters, init_chunks=init_chunks, progress=False)
    codebooks = codebooks.at[level].set(fit.centroids)
    sums = None
    for x, w in chunks():
        part = _level_sums(codebooks, x, w, level)
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    return codebooks, sums


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
        non_negative(c, "data.init_batches")
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

    def run_step(self, step_fn, state: TrainState, train_it: EmbeddingChunks):
        """Fits level `state.step` streamed over a pass per k-means iteration; `train_step` stores it."""
        level = int(jax.device_get(state.step))
        m = self.config.model
        codebooks, sums = fit_level(next(train_it), state.params["codebooks"], level,
                                    jax.random.fold_in(jax.random.key(self.config.seed), level),
                                    iters=m.kmeans_iters, init_chunks=self.config.data.init_batches)
        return step_fn(state, {"codebooks": codebooks, **sums})

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
        rows, counts = jnp.maximum(batch["rows"], 1.0), batch["counts"]
        metrics = {"loss": batch["error"] / rows, "cosine": batch["cosine"] / rows, "level": state.step + 1,
                   "usage": jnp.mean(counts > 0), "perplexity": perplexity(counts)}
        return state.replace(params={"codebooks": batch["codebooks"]}), metrics

    def train_iterator(self, mesh):
        return embedding_chunks(self.config, self.mulan, mesh)
