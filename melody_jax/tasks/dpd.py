"""Dual-path diffusion stage (DESIGN §4.5): multi-chunk velocity MSE with CFG token dropout.

Data (`config.data.source`, melody_jax/tasks/sources.py): `cached` reads VAE-GAN latents with their
semantic tokens from the records `launch.tokenize` writes; where a batch carries `latent_mask [B, L]`
(latents cached from a clip shorter than the crop) the velocity MSE averages the valid frames only.
`synthetic` (tests, benchmarks) makes latents that are a known function of the tokens plus structure
the tokens do not give: each 25-Hz token selects a fixed random 16-d pattern, patterns are interpolated smoothly (raised-cosine) to the latent frame
rate, and a slow drift (two sinusoids per channel, one and two cycles per clip, random amplitude
and phase per example) is added; the sum is clipped to [-1, 1] like real latents. Batches are a
pure function of (seed, split, batch index) — the held-out split is a stream of its own, the pattern
table shared — so the iterator's position is one integer.

The network diffuses `model.input_scale` · latents (1 = the paper). VAE-GAN latents lie in [-1, 1] with a
spread far below the noise's (std 0.17 in the 2-hour recipe: a signal-to-noise ratio of one at δ ≈ 0.17), which
latent diffusion models scale to unit variance; at the 2-hour recipe's size both 5.8 (unit variance) and 0.5
sampled worse than 1 (README "Evaluation").

Evaluation adds the paper's architecture-ablation measures at one fixed angle δ = π/4: velocity
MSE (in the scaled space) and the SI-SNR improvement of ẑ = predict_clean(z_δ, v̂, δ) over z_δ.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipeline.indexed import IndexedBatches
from melody_jax.audio.metrics import si_snr
from melody_jax.diffusion.angles import (SCHEDULES, add_noise, chunk_boundaries, multi_chunk_noising, predict_clean,
                                         velocity)
from melody_jax.frozen.stage_models import build_model, dpd_params
from melody_jax.models.dpd import DPD
from melody_jax.tasks.sources import SourcedTask, cache_shards, split_index
from melody_jax.training.config import non_negative, one_of, positive, require
from melody_jax.training.errors import ConfigError
from melody_jax.training.task import Batch, Metrics

EVAL_ANGLE = math.pi / 4


def token_patterns(seed: int, vocab_size: int, latent_dim: int, scale: float) -> np.ndarray:
    """The synthetic world's fixed token → latent pattern table [V, latent_dim] (same for all splits)."""
    return np.random.default_rng([seed, 0xD9D]).normal(0.0, scale, (vocab_size, latent_dim)).astype(np.float32)


def token_content(patterns: np.ndarray, tokens: np.ndarray, length: int) -> np.ndarray:
    """The tokens' part of the latents [B, L, D]: patterns interpolated (raised cosine) to L frames."""
    token_length = tokens.shape[1]
    pos = (np.arange(length) + 0.5) * token_length / length - 0.5  # frame centres in token units
    left = np.floor(pos)
    w = ((1 - np.cos(np.pi * (pos - left))) / 2)[None, :, None]
    lo, hi = (np.clip(i, 0, token_length - 1).astype(int) for i in (left, left + 1))
    return (1 - w) * patterns[tokens[:, lo]] + w * patterns[tokens[:, hi]]


def synthetic_batch(
    patterns: np.ndarray, seed: int, split: int, index: int, batch: int, length: int, token_length: int,
    drift_scale: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(latents float32 [B, L, D] in [-1, 1], tokens int32 [B, T_ST]) for one global batch."""
    rng = np.random.default_rng([seed, split, index])
    tokens = rng.integers(0, len(patterns), (batch, token_length)).astype(np.int32)
    amplitude = rng.normal(0.0, drift_scale, (batch, 2, 1, patterns.shape[1]))
    phase = rng.uniform(0.0, 2 * np.pi, (batch, 2, 1, patterns.shape[1]))
    cycles = np.arange(1, 3)[None, :, None, None] * np.arange(length)[None, None, :, None] / length
    drift = (amplitude * np.sin(2 * np.pi * cycles + phase)).sum(1)
    latents = np.clip(token_content(patterns, tokens, length) + drift, -1.0, 1.0)
    return latents.astype(np.float32), tokens


def synthetic_latents(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, split: str) -> IndexedBatches:
    """Endless global batches {"latents", "tokens"} of `split`; the position is the batch index."""
    c = config
    patterns = token_patterns(c.seed, c.model.vocab_size, c.model.latent_dim, c.data.pattern_scale)

    def make(index: int) -> dict[str, np.ndarray]:
        latents, tokens = synthetic_batch(patterns, c.seed, split_index(split), index, c.train.batch_size,
                                          c.data.latent_length, c.data.token_length, c.data.drift_scale)
        return {"latents": latents, "semantic_tokens": tokens}

    return IndexedBatches(make, c.train.batch_size, mesh)




CHUNK_EDGES = ("even", "tokens")


def training_chunk_length(config) -> int | None:
    """Multi-chunk training's chunk length in frames: None with `model.chunk_edges="even"` (edges
    ⌊m·L/M⌋), else the continuation chunk — ⌈T_ST / M⌉ tokens of L / T_ST frames, the last chunk
    Algorithm 2 regenerates — so the chunks continuation noises are chunks training saw."""
    m, d = config.model, config.data
    if m.chunk_edges == "even":
        return None
    return math.ceil(d.token_length / m.num_chunks) * (d.latent_length // d.token_length)


class DPDTask(SourcedTask):
    name = "dpd"
    sources = ("synthetic", "cached")

    def validate(self) -> None:
        m, d = self.config.model, self.config.data
        self.check_data()
        positive(self.config, "model.latent_dim", "model.input_scale", "model.hidden_dim", "model.num_blocks",
                 "model.segment_length", "model.num_heads", "model.roformer_layers", "model.mlp_dim",
                 "model.angle_dim", "model.vocab_size", "model.num_chunks", "data.latent_length", "data.token_length")
        non_negative(self.config, "data.pattern_scale", "data.drift_scale")
        require(m.hidden_dim % m.num_heads == 0,
                f"config.model.num_heads={m.num_heads} does not divide hidden_dim={m.hidden_dim}")
        require((m.hidden_dim // m.num_heads) % 2 == 0,
                f"config.model.hidden_dim={m.hidden_dim} / num_heads={m.num_heads} must be even (rotary)")
        require(m.segment_length % 2 == 0, f"config.model.segment_length={m.segment_length} must be even "
                "(segments overlap by half)")
        require(d.latent_length >= m.segment_length, f"config.data.latent_length={d.latent_length} must be >= "
                f"model.segment_length={m.segment_length}")
        require(d.latent_length % d.token_length == 0, f"config.data.token_length={d.token_length} must divide "
                f"data.latent_length={d.latent_length} (whole frames per token; 250 Hz / 25 Hz = 10)")
        require(m.num_chunks <= d.latent_length,
                f"config.model.num_chunks={m.num_chunks} must be <= data.latent_length={d.latent_length}")
        require(m.chunk_edges in CHUNK_EDGES, f"config.model.chunk_edges={m.chunk_edges!r} must be one of {CHUNK_EDGES}")
        try:
            chunk_boundaries(d.latent_length, m.num_chunks, training_chunk_length(self.config))
        except ValueError as e:
            raise ConfigError(f"config.model.chunk_edges: {e}") from None
        one_of(self.config, "sample.schedule", SCHEDULES)
        positive(self.config, "sample.steps", "sample.duration", "sample.inpaint_candidates")
        non_negative(self.config, "sample.cfg", "sample.temperature", "sample.top_k")
        require(0 < self.config.sample.top_p <= 1, f"config.sample.top_p={self.config.sample.top_p} must lie in (0, 1]")
        require(0 <= m.continuation_share < 1,
                f"config.model.continuation_share={m.continuation_share} must lie in [0, 1)")
        require(0 <= m.cfg_dropout < 1, f"config.model.cfg_dropout={m.cfg_dropout} must lie in [0, 1)")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")
        try:
            self.model.resolved_merge_lengths()
        except ValueError as e:
            raise ConfigError(f"config.model.merge_lengths: {e}") from None

    @property
    def model(self) -> DPD:
        return build_model(self.config).module

    def init_params(self, rng: jax.Array) -> Any:
        return dpd_params(self.model, self.config, rng)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        noise_key, drop_key = jax.random.split(rng)
        m = self.config.model
        noisy = multi_chunk_noising(noise_key, batch["latents"] * m.input_scale, m.num_chunks,
                                    training_chunk_length(self.config), m.continuation_share if train else 0.0)
        uncond = None
        if train and m.cfg_dropout > 0:
            uncond = jax.random.bernoulli(drop_key, m.cfg_dropout, (batch["semantic_tokens"].shape[0],))
        v_hat = self.model.apply({"params": params}, noisy.z_noisy, noisy.delta, batch["semantic_tokens"], uncond)
        error = jnp.mean(jnp.square(v_hat - noisy.target), -1)
        if "latent_mask" not in batch:
            return jnp.mean(error), {}
        valid = jnp.asarray(batch["latent_mask"], jnp.float32)  # latents cached from a clip shorter than the crop
        return (error * valid).sum() / jnp.maximum(valid.sum(), 1.0), {}

    def fixed_angle_metrics(self, params: Any, batch: Batch, rng: jax.Array, angle: float) -> Metrics:
        """Velocity MSE and SI-SNR improvement (dB) of ẑ over z_δ, every frame at `angle`, conditional."""
        z = batch["latents"] * self.config.model.input_scale
        eps = jax.random.normal(rng, z.shape, z.dtype)
        delta = jnp.full(z.shape[:2], angle, jnp.float32)
        z_delta = add_noise(z, eps, delta)
        v_hat = self.model.apply({"params": params}, z_delta, delta, batch["semantic_tokens"])
        z_hat = predict_clean(z_delta, v_hat, delta)
        return {"velocity_mse_quarter_pi": jnp.mean(jnp.square(v_hat - velocity(z, eps, delta))),
                "si_snri_db_quarter_pi": jnp.mean(si_snr(z_hat, z) - si_snr(z_delta, z))}

    def eval_step(self, params: Any, batch: Batch, rng: jax.Array) -> Metrics:
        fixed = self.fixed_angle_metrics(params, batch, jax.random.fold_in(rng, 1), EVAL_ANGLE)
        return {**super().eval_step(params, batch, rng), **fixed}

    def _records(self, mesh: jax.sharding.Mesh, shards: list[tuple[str, int]]):
        from data_pipeline.token_records import Field, RecordIterator  # TensorFlow: only when used

        c = self.config
        fields = {"latents": Field((c.data.latent_length, c.model.latent_dim)),
                  "semantic_tokens": Field((c.data.token_length,), c.model.vocab_size)}
        return RecordIterator(shards, fields, global_batch_size=c.train.batch_size, mesh=mesh, seed=c.seed,
                              shuffle_buffer=c.data.shuffle_buffer)

    def batches(self, mesh: jax.sharding.Mesh, split: str):
        if self.config.data.source == "cached":
            return self._records(mesh, cache_shards(self.config.data.path, split))
        return synthetic_latents(self.config, mesh, split)
