"""HuBERT targets for the ssl stage: k-means clusters of frame features, fitted once before training and
assigned inside the jitted step.

Iteration 1 clusters acoustic features (`model.target_features`: log-mel, MFCC, chroma; melody_jax.audio.
frame_features); iteration 2 (`upstream.ssl` set) clusters block `model.target_layer` of that trained SSL
model. Each feature is standardised with the fitting frames' mean and deviation, then k-means (k-means++,
full Lloyd) finds `model.num_targets` centres. Fitting is deterministic (config seed, the training
stream's first `model.target_batches` batches), so a resumed run recomputes the same targets.
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


def target_frames(config, upstream: Stage | None, hop: int) -> Frames:
    """The features that are clustered: the upstream SSL model's layer, or the acoustic features."""
    m = config.model
    if upstream is None:
        names = tuple(m.target_features)
        return lambda _, audio: frame_features(audio, config.data.sample_rate, hop, names)
    layer = resolve_layer(m.target_layer, upstream.config.model.num_layers)
    return lambda params, audio: hidden_states(upstream.model, layer, params, audio).astype(jnp.float32)


def labels(frames: Frames, frozen: dict[str, Any], audio: jax.Array) -> jax.Array:
    """int32 [B, T]: each frame's target cluster (`frozen`: fit_targets's arrays + the upstream params)."""
    x = frames(frozen.get("upstream"), audio)
    return assign((x - frozen["mean"]) / frozen["std"], frozen["centroids"])


def fit_targets(frames: Frames, upstream_params: Any, batches, num_batches: int, hop: int, num_targets: int,
                key: jax.Array, mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """{"mean", "std" [D], "centroids" [K, D]} from the frames of `num_batches` batches (padding left out)."""
    embed = jax.jit(frames)
    xs, ws = [], []
    for _ in range(num_batches):
        batch = next(batches)
        x = embed(upstream_params, batch["audio"])
        b, t, d = x.shape
        xs.append(x.reshape(-1, d))
        ws.append(batch["mask"][:, : t * hop].reshape(b, t, hop).min(-1).reshape(-1).astype(jnp.float32))
    x, w = jnp.stack(xs), jnp.stack(ws)
    total = jnp.maximum(w.sum(), 1.0)
    mean = jnp.einsum("cn,cnd->d", w, x) / total
    std = jnp.sqrt(jnp.einsum("cn,cnd->d", w, jnp.square(x - mean)) / total) + 1e-5
    fit = fit_kmeans(*shard_rows((x - mean) / std, w, mesh), num_targets, key, iters=KMEANS_ITERS, progress=False)
    return {"mean": mean, "std": std, "centroids": fit.centroids}
