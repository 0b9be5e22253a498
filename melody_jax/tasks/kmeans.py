"""kmeans stage (DESIGN §4.2, §7): 1024 centroids over a frozen SSL model's layer-l frames.

Like the rvq stage it runs through the generic loop without gradients: one training step = one
k-means iteration (full Lloyd with sums and counts accumulated exactly over the pass, or one
mini-batch pass), streamed: each step re-reads `data.num_batches` batches of the training set (0 = one
pass) through the SSL model, keeps `data.frames_per_crop` random frames per crop (0 = all) and holds one
batch's frames at a time, so the frames never have to fit in memory. Step 1 seeds by k-means++ on the
first `data.init_batches` batches (0 = the whole pass: what an in-memory fit does). `loss` = inertia per
frame, `inertia` = Σ squared distances, both logged every step with the loop's tqdm bar. The centroids
are the state's params, so the normal Orbax checkpointing saves them and a rerun resumes at the next
iteration (every pass reads the same crops, so the position is the number of passes).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from data_pipeline.input import make_train_iterator
from melody_jax.audio.padding import frame_mask
from melody_jax.nn.kmeans import init_from_sample, stream_pass
from melody_jax.nn.quantizers import perplexity
from melody_jax.frozen.checks import require_upstream
from melody_jax.frozen.loader import Stage, load_stage
from melody_jax.frozen.semantic import hidden_states, resolve_layer
from melody_jax.frozen.stage_models import build_model
from melody_jax.tasks.sources import check_data
from melody_jax.training.config import non_negative, one_of, positive, require
from melody_jax.training.sharding import config_rules
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch, FittingTask, Passes

INIT_STREAM = 11  # the k-means++ seeding's random stream, apart from the frames'


def frame_embeddings(model, layer: int, params, audio: jax.Array, mask: jax.Array, rng: jax.Array,
                     frames_per_crop: int) -> tuple[jax.Array, jax.Array]:
    """([B·F, D] frames, [B·F] weights): F random frames per crop; a frame counts if its samples are all real."""
    h = hidden_states(model, layer, params, audio).astype(jnp.float32)
    b, t, d = h.shape
    valid = frame_mask(mask, model.hop, t)
    if frames_per_crop and frames_per_crop < t:
        pick = jnp.argsort(jax.random.uniform(rng, (b, t)), 1)[:, :frames_per_crop]
        h, valid = jnp.take_along_axis(h, pick[..., None], 1), jnp.take_along_axis(valid, pick, 1)
    return h.reshape(-1, d), valid.reshape(-1)


class FramePasses(Passes):
    """The SSL model's frames of `data.num_batches` batches (0 = one pass over the training set), one chunk
    (a batch's [N, D] frames and [N] weights, rows sharded over the batch axes) at a time. `next()` hands
    out a fresh pass — the same crops and frames every time, re-read from the start of the audio stream —
    so nothing but one chunk is in memory; the position is the number of passes handed out."""

    def __init__(self, config, ssl: Stage, mesh: jax.sharding.Mesh):
        c = config
        m = ssl.config.model
        require(c.model.embed_dim == m.embed_dim,
                f"config.model.embed_dim={c.model.embed_dim} but the SSL model in {c.upstream.ssl} is {m.embed_dim}")
        layer = resolve_layer(c.model.layer, m.num_layers)
        require(0 <= layer <= m.num_layers, f"config.model.layer={c.model.layer} but the SSL model has "
                                            f"{m.num_layers} blocks")
        data = ssl.config.data.copy_and_resolve_references()
        data.path = c.data.path or data.path
        data.crop_seconds = c.data.crop_seconds
        self.audio = make_train_iterator(data, global_batch_size=c.data.embed_batch_size, mesh=mesh, seed=c.seed,
                                         with_text=False)
        self.start = self.audio.get_state()
        self.num_batches = c.data.num_batches or math.ceil(self.audio.examples_per_epoch / self.audio.local_batch_size)
        self.params, self.seed, self.progress = ssl.params, c.seed, c.train.progress_bar
        self.embed = jax.jit(lambda p, a, mk, r: frame_embeddings(ssl.model, layer, p, a, mk, r,
                                                                  c.data.frames_per_crop))

    def chunks(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        self.audio.set_state(self.start)
        for i in tqdm(range(self.num_batches), desc="ssl frames", leave=False,
                      disable=jax.process_index() != 0 or not self.progress):
            batch = next(self.audio)
            rng = jax.random.fold_in(jax.random.key(self.seed), i)
            yield self.embed(self.params, batch["audio"], batch["mask"], rng)


class KMeansTask(FittingTask):
    name = "kmeans"
    sources = ("upstream_audio",)

    def validate(self) -> None:
        c = self.config
        positive(c, "model.num_clusters", "model.embed_dim", "data.crop_seconds", "data.embed_batch_size")
        non_negative(c, "data.num_batches", "data.frames_per_crop", "data.init_batches")
        one_of(c, "model.mode", ("full", "minibatch"))
        check_data(c, self.sources)
        require_upstream(c, "ssl")
        require(c.model.layer >= -1, f"config.model.layer={c.model.layer} must be -1 (middle) or a block index")

    ssl: Stage | None = None  # the frozen SSL stage of `upstream.ssl`, set by `setup`

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        if self.ssl is None:
            self.ssl = load_stage(self.config.upstream.ssl, "ssl", mesh, config_rules(self.config),
                                  field="config.upstream.ssl")

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    def run_step(self, step_fn, state: TrainState, train_it: FramePasses):
        """One iteration streamed over a pass (step 1 seeds by k-means++ on the first `data.init_batches`
        chunks first); `train_step` then stores what the pass gave."""
        m, chunks = self.config.model, next(train_it)
        if int(jax.device_get(state.step)) == 0:
            key = jax.random.fold_in(jax.random.key(self.config.seed), INIT_STREAM)
            centroids, totals = init_from_sample(chunks, m.num_clusters, key, self.config.data.init_batches), None
        else:
            centroids, totals = state.params["centroids"], state.params["counts"]
        totals = jnp.zeros(m.num_clusters) if totals is None or m.mode == "full" else totals
        centroids, counts, inertia = stream_pass(chunks, centroids, m.mode, totals)
        return step_fn(state, {"centroids": centroids, "counts": counts, "inertia": inertia})

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
        counts, inertia = batch["counts"], batch["inertia"]
        frames = jnp.maximum(counts.sum(), 1.0)  # full: the pass's frames; mini-batch: all seen so far
        metrics = {"loss": inertia / frames, "inertia": inertia, "iteration": state.step + 1,
                   "usage": jnp.mean(counts > 0), "perplexity": perplexity(counts)}
        return state.replace(params={"centroids": batch["centroids"], "counts": counts}), metrics

    def train_iterator(self, mesh):
        return FramePasses(self.config, self.ssl, mesh)
