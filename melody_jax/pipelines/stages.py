"""The trained stages as frozen functions: what sampling, `launch.tokenize` and later stages call.

The semantic tokenizer is `tokenizers.semantic.SemanticTokenizer` (`load_semantic_tokenizer`).

Each component is built from a stage directory (a training workdir or a bundle's stage folder, see
`training.frozen.load_stage`) and exposes pure, traceable functions of (params, inputs) — usable
inside another stage's jitted step — plus jitted conveniences that bind the parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from melody_jax.models import vae_gan
from melody_jax.models.mulan import MuLan, l2_normalize, mulan_tokens
from melody_jax.tasks.vae_gan import load_vae_gan
from melody_jax.tokenizers.semantic import SemanticTokenizer, load_semantic_tokenizer
from melody_jax.tokenizers.text import tokenize as text_tokenize
from melody_jax.training.errors import ConfigError
from melody_jax.training.frozen import load_stage

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
class FrozenMuLan:
    """Text or audio → the semantic LM's prefix: MuLan embedding → RVQ tokens (DESIGN §4.3)."""

    model: MuLan
    params: Any  # {"mulan": ..., "codebooks": [Q, K, D]}
    max_text_length: int
    window: int  # samples per audio-tower window (its training crop)

    def audio_embedding_fn(self, params: Any, audio: jax.Array) -> jax.Array:
        """[B, T] (T ≥ one window) → [B, D]: the unit-norm mean embedding over whole windows."""
        b, t = audio.shape
        n = max(1, t // self.window)
        windows = audio[:, : n * self.window].reshape(b * n, self.window) if t >= self.window else audio
        emb = self.model.apply({"params": params["mulan"]}, windows, method=MuLan.embed_audio)
        return l2_normalize(emb.reshape(b, -1, emb.shape[-1]).mean(1))

    def audio_tokens_fn(self, params: Any, audio: jax.Array) -> jax.Array:
        """[B, T] → int32 [B, Q]: RVQ of the audio embedding."""
        return mulan_tokens(params["codebooks"], self.audio_embedding_fn(params, audio))

    def text_embedding_fn(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return self.model.apply({"params": params["mulan"]}, tokens, mask, method=MuLan.embed_text)

    @functools.cached_property
    def _jitted(self) -> dict[str, Any]:
        tokens = lambda params, *x: mulan_tokens(params["codebooks"], self.text_embedding_fn(params, *x))  # noqa: E731
        return {"audio_tokens": jax.jit(self.audio_tokens_fn), "audio_embeddings": jax.jit(self.audio_embedding_fn),
                "text_tokens": jax.jit(tokens), "text_embeddings": jax.jit(self.text_embedding_fn)}

    def text_tokens(self, prompts: Sequence[str]) -> jax.Array:
        return self._jitted["text_tokens"](self.params, *text_tokenize(list(prompts), self.max_text_length))

    def text_embeddings(self, prompts: Sequence[str]) -> jax.Array:
        return self._jitted["text_embeddings"](self.params, *text_tokenize(list(prompts), self.max_text_length))

    def audio_tokens(self, audio: jax.Array) -> jax.Array:
        return self._jitted["audio_tokens"](self.params, jnp.asarray(audio, jnp.float32))

    def audio_embeddings(self, audio: jax.Array) -> jax.Array:
        return self._jitted["audio_embeddings"](self.params, jnp.asarray(audio, jnp.float32))


def load_vae(directory: str, mesh: jax.sharding.Mesh, rules) -> FrozenVAE:
    task, params = load_vae_gan(directory, mesh, rules)
    return FrozenVAE(task.model, params, task.config.data.sample_rate, task.config.model.latent_dim)


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


def tokenize_clips(clips: list[np.ndarray], vae: FrozenVAE, tokenizer: SemanticTokenizer, mulan: FrozenMuLan,
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


def tokenize_dataset(data_path: str, split: str, out: str, stage_dirs: dict[str, str], crop_seconds: float,
                     batch_size: int, mesh: jax.sharding.Mesh, rules) -> dict[str, np.ndarray]:
    """Runs the frozen VAE encoder, SSL + k-means and MuLan + RVQ over a prepared dataset split and
    writes every crop's latents and tokens to the TFRecord `out` (atomically); returns the arrays.

    `stage_dirs` names the directories of "vae_gan", "ssl", "kmeans", "mulan" and "rvq".
    """
    from data_pipeline.builder import read_clips
    from melody_jax.tokenizers.token_records import write_records

    d = stage_dirs
    vae = load_vae(d["vae_gan"], mesh, rules)
    tokenizer = load_semantic_tokenizer(d["kmeans"], d["ssl"], mesh, rules)
    mulan = load_mulan(d["mulan"], d["rvq"], mesh, rules)
    if tokenizer.sample_rate != vae.sample_rate:
        raise ConfigError(f"the ssl stage works at {tokenizer.sample_rate} Hz, the vae_gan at {vae.sample_rate} Hz")
    crop = int(round(crop_seconds * vae.sample_rate))
    if crop % tokenizer.hop or crop % vae.hop:
        raise ConfigError(f"--crop_seconds={crop_seconds}: {crop} samples is not a whole number of semantic "
                          f"tokens ({tokenizer.hop} samples) and latent frames ({vae.hop} samples)")
    clips = [x["audio"] for x in read_clips(data_path, split, vae.sample_rate)]
    arrays = tokenize_clips(clips, vae, tokenizer, mulan, crop, batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_records(out + ".partial", arrays)
    os.replace(out + ".partial", out)
    return arrays
