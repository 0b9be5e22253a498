"""kmeans stage (DESIGN §4.2, §7): 1024 centroids over a frozen SSL model's layer-l frames.

Like the rvq stage it runs through the generic loop without gradients: one training step = one
k-means iteration (full Lloyd over every collected frame, or one mini-batch pass), step 1 seeds by
k-means++ first; `loss` = inertia per frame, `inertia` = Σ squared distances, both logged every step
with the loop's tqdm bar. The centroids are the state's params, so the normal Orbax checkpointing
saves them and a rerun resumes at the next iteration. The iterator runs the SSL model once over
`data.num_batches` batches of the training set (0 = one pass), keeps `data.frames_per_crop` random
frames per crop (0 = all) and hands the same chunked, batch-sharded [C, N, D] matrix to every step.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from tqdm import tqdm

from data_pipeline.indexed import RepeatedBatch
from data_pipeline.input import make_train_iterator
from melody_jax.nn.kmeans import kmeans_plusplus, lloyd_step, minibatch_step
from melody_jax.nn.quantizers import perplexity
from melody_jax.frozen.checks import require_upstream
from melody_jax.frozen.loader import Stage, load_stage
from melody_jax.frozen.semantic import hidden_states, resolve_layer
from melody_jax.frozen.stage_models import build_model
from melody_jax.tasks.sources import check_data
from melody_jax.training.config import non_negative, one_of, positive, require
from melody_jax.training.sharding import config_rules
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch, FittingTask


def frame_embeddings(model, layer: int, params, audio: jax.Array, mask: jax.Array, rng: jax.Array,
                     frames_per_crop: int) -> tuple[jax.Array, jax.Array]:
    """([B·F, D] frames, [B·F] weights): F random frames per crop; a frame counts if its samples are all real."""
    h = hidden_states(model, layer, params, audio).astype(jnp.float32)
    b, t, d = h.shape
    valid = mask[:, : t * model.hop].reshape(b, t, model.hop).min(-1)
    if frames_per_crop and frames_per_crop < t:
        pick = jnp.argsort(jax.random.uniform(rng, (b, t)), 1)[:, :frames_per_crop]
        h, valid = jnp.take_along_axis(h, pick[..., None], 1), jnp.take_along_axis(valid, pick, 1)
    return h.reshape(-1, d), valid.reshape(-1)


def frame_batches(config, ssl: Stage, mesh: jax.sharding.Mesh) -> RepeatedBatch:
    """The same [C, N, D] frames and [C, N] weights every step (rows sharded over the batch axes)."""
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
    audio_it = make_train_iterator(data, global_batch_size=c.data.embed_batch_size, mesh=mesh, seed=c.seed,
                                   with_text=False)
    n = c.data.num_batches or math.ceil(audio_it.examples_per_epoch / audio_it.local_batch_size)
    embed = jax.jit(lambda p, a, mk, r: frame_embeddings(ssl.model, layer, p, a, mk, r, c.data.frames_per_crop))
    xs, ws = [], []
    for i in tqdm(range(n), desc="ssl frames", disable=jax.process_index() != 0 or not c.train.progress_bar):
        batch = next(audio_it)
        x, w = embed(ssl.params, batch["audio"], batch["mask"], jax.random.fold_in(jax.random.key(c.seed), i))
        xs.append(x)
        ws.append(w)
    return RepeatedBatch({"embeddings": jnp.stack(xs), "weights": jnp.stack(ws)})


class KMeansTask(FittingTask):
    name = "kmeans"
    sources = ("upstream_audio",)

    def validate(self) -> None:
        c = self.config
        positive(c, "model.num_clusters", "model.embed_dim", "data.crop_seconds", "data.embed_batch_size")
        non_negative(c, "data.num_batches", "data.frames_per_crop")
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

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
        m = self.config.model
        x, w = batch["embeddings"], batch["weights"]
        centroids = jax.lax.cond(state.step == 0, lambda: kmeans_plusplus(rng, x, w, m.num_clusters),
                                 lambda: state.params["centroids"])
        if m.mode == "full":
            centroids, s = lloyd_step(x, w, centroids)
            inertia, counts = s.inertia, s.counts
        else:
            totals = jnp.where(state.step == 0, 0.0, state.params["counts"])
            centroids, counts, inertia = minibatch_step(x, w, centroids, totals)
        frames = jnp.maximum(w.sum(), 1.0)
        metrics = {"loss": inertia / frames, "inertia": inertia, "iteration": state.step + 1,
                   "usage": jnp.mean(counts > 0), "perplexity": perplexity(counts)}
        return state.replace(params={"centroids": centroids, "counts": counts}), metrics

    def train_iterator(self, mesh):
        return frame_batches(self.config, self.ssl, mesh)
