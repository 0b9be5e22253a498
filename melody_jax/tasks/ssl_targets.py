"""HuBERT targets for the ssl stage: k-means clusters of frame features, fitted once before training and
assigned inside the jitted step.

Iteration 1 clusters acoustic features (melody_jax.audio.frame_features): each entry of `model.target_features`
is one codebook, of the "+"-joined features side by side ("mfcc+chroma"), and the model predicts every
codebook's target with its own head (HuBERT's cluster ensembles; MERT's acoustic and musical teachers): each
feature gets clusters of its own instead of the widest one deciding a joint clustering (64 log-mel bands beside
12 chroma bins). Iteration 2 (`upstream.ssl` set) clusters block `model.target_layer` of that trained SSL
model, one codebook. Each codebook's frames are standardised with the fitting frames' mean and deviation, then
k-means (k-means++, full Lloyd) finds `model.num_targets` centres. Fitting is deterministic (config seed, the
training stream's first `model.target_batches` batches), so a resumed run recomputes the same targets.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from melody_jax.audio.frame_features import frame_features
from melody_jax.frozen.loader import Stage
from melody_jax.frozen.semantic import hidden_states, resolve_layer
from melody_jax.nn.kmeans import assign, fit_kmeans, shard_rows

KMEANS_ITERS = 30

Frames = Callable[[Any, jax.Array], jax.Array]  # (upstream params or None, audio [B, N]) → [B, T, D]


def target_frames(config, upstream: Stage | None, hop: int) -> list[Frames]:
    """What each codebook clusters: the upstream SSL model's layer, or each entry's acoustic features."""
    m = config.model
    if upstream is None:
        rate = config.data.sample_rate
        return [lambda _, audio, names=tuple(entry.split("+")): frame_features(audio, rate, hop, names)
                for entry in m.target_features]
    layer = resolve_layer(m.target_layer, upstream.config.model.num_layers)
    return [lambda params, audio: hidden_states(upstream.model, layer, params, audio).astype(jnp.float32)]


def labels(frames: list[Frames], frozen: dict[str, Any], audio: jax.Array) -> jax.Array:
    """int32 [B, T, C]: each frame's target cluster in each codebook (`frozen`: fit_targets's codebooks + the
    upstream params)."""
    return jnp.stack([assign((f(frozen.get("upstream"), audio) - cb["mean"]) / cb["std"], cb["centroids"])
                      for f, cb in zip(frames, frozen["codebooks"])], -1)


def fit_targets(frames: list[Frames], upstream_params: Any, batches, num_batches: int, hop: int, num_targets: int,
                key: jax.Array, mesh: jax.sharding.Mesh) -> dict[str, list[dict[str, jax.Array]]]:
    """{"codebooks": [{"mean", "std" [D], "centroids" [K, D]}, ...]}, one per `frames` entry, from the frames of
    `num_batches` batches (padding left out)."""
    embed = jax.jit(lambda p, a: [f(p, a) for f in frames])
    xs, ws = [], []
    for _ in range(num_batches):
        batch = next(batches)
        x = embed(upstream_params, batch["audio"])
        b, t, _ = x[0].shape
        xs.append([y.reshape(b * t, -1) for y in x])
        ws.append(batch["mask"][:, : t * hop].reshape(b, t, hop).min(-1).reshape(-1).astype(jnp.float32))
    w = jnp.stack(ws)
    total = jnp.maximum(w.sum(), 1.0)
    codebooks = []
    for i in range(len(frames)):
        x = jnp.stack([y[i] for y in xs])
        mean = jnp.einsum("cn,cnd->d", w, x) / total
        std = jnp.sqrt(jnp.einsum("cn,cnd->d", w, jnp.square(x - mean)) / total) + 1e-5
        fit = fit_kmeans(*shard_rows((x - mean) / std, w, mesh), num_targets, jax.random.fold_in(key, i),
                         iters=KMEANS_ITERS, progress=False)
        codebooks.append({"mean": mean, "std": std, "centroids": fit.centroids})
    return {"codebooks": codebooks}
