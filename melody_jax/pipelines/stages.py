"""The trained stages as frozen functions: what sampling, `launch.tokenize` and later stages call.

Each component is built from a stage directory (a training workdir or a bundle's stage folder, see
`training.frozen.load_stage`) and exposes pure, traceable functions of (params, inputs) — usable
inside another stage's jitted step — plus jitted conveniences that bind the parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from melody_jax.models import vae_gan
from melody_jax.models.mulan import MuLan, l2_normalize, mulan_tokens
from melody_jax.tokenizers.semantic import resolve_layer, tokenize
from melody_jax.tokenizers.text import tokenize as text_tokenize
from melody_jax.training.errors import ConfigError
from melody_jax.training.frozen import load_stage

GAN_KEEP = ("generator", "generator_state")  # a GAN's discriminator is not needed after training


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenVAE:
    """24 kHz audio ↔ mapped latents in [-1, 1] (DESIGN §4.1)."""

    model: vae_gan.VAEGAN
    params: Any
    sample_rate: int
    latent_dim: int

    @property
    def hop(self) -> int:
        return self.model.hop

    def encode_fn(self, params: Any, audio: jax.Array) -> jax.Array:
        return vae_gan.encode(params, audio, self.model)

    @functools.cached_property
    def _encode(self):
        return jax.jit(self.encode_fn)

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda p, z: vae_gan.decode(p, z, self.model))

    def encode(self, audio: jax.Array) -> jax.Array:
        """[B, T] → [B, ceil(T / hop), latent]."""
        return self._encode(self.params, jnp.asarray(audio, jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """[B, L, latent] → [B, hop · L]."""
        return self._decode(self.params, jnp.asarray(z, jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenTokenizer:
    """Audio → 25 Hz semantic tokens: an SSL layer's states, nearest k-means centroid (DESIGN §4.2)."""

    model: Any  # Wav2Vec2Conformer
    layer: int
    params: Any  # {"ssl": ..., "centroids": [K, D]}
    sample_rate: int

    @property
    def hop(self) -> int:
        return self.model.hop

    @property
    def vocab_size(self) -> int:
        return int(self.params["centroids"].shape[0])

    def tokenize_fn(self, params: Any, audio: jax.Array) -> jax.Array:
        return tokenize(self.model, self.layer, params["ssl"], params["centroids"], audio)

    @functools.cached_property
    def _tokenize(self):
        return jax.jit(self.tokenize_fn)

    def __call__(self, audio: jax.Array) -> jax.Array:
        """[B, T] → int32 [B, T // hop]."""
        return self._tokenize(self.params, jnp.asarray(audio, jnp.float32))


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenMuLan:
    """Text or audio → the semantic LM's prefix: MuLan embedding → RVQ tokens (DESIGN §4.3)."""

    model: MuLan
    params: Any  # {"mulan": ..., "codebooks": [Q, K, D]}
    max_text_length: int
    window: int  # samples per audio-tower window (its training crop)

    def audio_tokens_fn(self, params: Any, audio: jax.Array) -> jax.Array:
        """[B, T] (T ≥ one window) → int32 [B, Q]: RVQ of the mean embedding over whole windows."""
        b, t = audio.shape
        n = max(1, t // self.window)
        windows = audio[:, : n * self.window].reshape(b * n, self.window) if t >= self.window else audio
        emb = self.model.apply({"params": params["mulan"]}, windows, method=MuLan.embed_audio)
        emb = l2_normalize(emb.reshape(b, -1, emb.shape[-1]).mean(1))
        return mulan_tokens(params["codebooks"], emb)

    @functools.cached_property
    def _audio_tokens(self):
        return jax.jit(self.audio_tokens_fn)

    @functools.cached_property
    def _text_tokens(self):
        def fn(params, tokens, mask):
            emb = self.model.apply({"params": params["mulan"]}, tokens, mask, method=MuLan.embed_text)
            return mulan_tokens(params["codebooks"], emb)
        return jax.jit(fn)

    def text_tokens(self, prompts: Sequence[str]) -> jax.Array:
        tokens, mask = text_tokenize(list(prompts), self.max_text_length)
        return self._text_tokens(self.params, tokens, mask)

    def audio_tokens(self, audio: jax.Array) -> jax.Array:
        return self._audio_tokens(self.params, jnp.asarray(audio, jnp.float32))


def load_vae(directory: str, mesh: jax.sharding.Mesh, rules, field: str = "vae_gan") -> FrozenVAE:
    task, params, _ = load_stage(directory, "vae_gan", mesh, rules, field=field, keep=GAN_KEEP)
    c = task.config
    return FrozenVAE(task.model, params["generator"], c.data.sample_rate, c.model.latent_dim)


def load_tokenizer(ssl_dir: str, kmeans_dir: str, mesh: jax.sharding.Mesh, rules) -> FrozenTokenizer:
    ssl_task, ssl_params, _ = load_stage(ssl_dir, "ssl", mesh, rules, field="ssl")
    km_task, km_params, _ = load_stage(kmeans_dir, "kmeans", mesh, rules, field="kmeans", keep=("centroids",))
    layer = resolve_layer(km_task.config.model.layer, ssl_task.config.model.num_layers)
    return FrozenTokenizer(ssl_task.model, layer, {"ssl": ssl_params, "centroids": km_params["centroids"]},
                           ssl_task.config.data.sample_rate)


def load_mulan(mulan_dir: str, rvq_dir: str, mesh: jax.sharding.Mesh, rules) -> FrozenMuLan:
    task, params, _ = load_stage(mulan_dir, "mulan", mesh, rules, field="mulan")
    _, rvq_params, _ = load_stage(rvq_dir, "rvq", mesh, rules, field="rvq")
    c = task.config
    window = int(round(c.data.crop_seconds * c.data.sample_rate))
    return FrozenMuLan(task.model, {"mulan": params, "codebooks": rvq_params["codebooks"]},
                       c.model.max_text_length, window)


def crops(audio: np.ndarray, length: int) -> np.ndarray:
    """[T] → [n, length]: the whole non-overlapping crops of one clip (none if shorter)."""
    n = len(audio) // length
    return np.asarray(audio[: n * length], np.float32).reshape(n, length)


def frames(seconds: float, rate: float) -> int:
    return int(math.ceil(seconds * rate - 1e-9))


def tokenize_clips(clips: list[np.ndarray], vae: FrozenVAE, tokenizer: FrozenTokenizer, mulan: FrozenMuLan,
                   crop: int, batch_size: int) -> dict[str, np.ndarray]:
    """{latents [N, L, D], semantic_tokens [N, T], mulan_tokens [N, Q]} of every whole crop."""
    audio = np.concatenate([crops(c, crop) for c in clips] or [np.zeros((0, crop), np.float32)])
    if len(audio) == 0:
        raise ConfigError(f"--crop_seconds: no clip of the dataset is {crop} samples long")
    out: dict[str, list[np.ndarray]] = {"latents": [], "semantic_tokens": [], "mulan_tokens": []}
    for start in range(0, len(audio), batch_size):
        chunk = audio[start:start + batch_size]
        real = len(chunk)
        chunk = np.pad(chunk, ((0, batch_size - real), (0, 0)))  # one shape: one compilation
        out["latents"].append(np.asarray(vae.encode(chunk))[:real])
        out["semantic_tokens"].append(np.asarray(tokenizer(chunk))[:real])
        out["mulan_tokens"].append(np.asarray(mulan.audio_tokens(chunk))[:real])
    return {k: np.concatenate(v) for k, v in out.items()}
