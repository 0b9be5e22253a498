"""The trained MuLan + RVQ run frozen: text or audio → the semantic LM's prefix tokens (DESIGN §4.3).

Two stage directories (mulan, rvq) make one component: the MuLan embedding quantized by the RVQ
codebooks. Pure, traceable `*_fn`s for use inside another stage's jitted step, plus jitted
conveniences that bind the parameters.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from melody_jax.frozen.checks import need
from melody_jax.frozen.loader import load_stage
from melody_jax.models.mulan import MuLan, l2_normalize, mulan_tokens, valid_frames
from melody_jax.text.byte_tokenizer import tokenize as text_tokenize
from melody_jax.training.sharding import Rules


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenMuLan:
    model: MuLan
    params: Any  # {"mulan": ..., "codebooks": [Q, K, D]}
    max_text_length: int
    window: int  # samples per audio-tower window (its training crop)
    sample_rate: int

    @classmethod
    def load(cls, mulan_dir: str, rvq_dir: str, mesh: jax.sharding.Mesh, rules: Rules, *,
             fields: tuple[str, str] = ("mulan", "rvq")) -> "FrozenMuLan":
        mulan = load_stage(mulan_dir, "mulan", mesh, rules, field=fields[0])
        rvq = load_stage(rvq_dir, "rvq", mesh, rules, field=fields[1])
        c = mulan.config
        need(rvq.config.model.embed_dim == c.model.out_dim, f"{fields[1]}: rvq quantizes "
             f"{rvq.config.model.embed_dim}-d embeddings, mulan embeds to {c.model.out_dim}")
        window = int(round(c.data.crop_seconds * c.data.sample_rate))
        return cls(mulan.model, {"mulan": mulan.params, "codebooks": rvq.params["codebooks"]},
                   c.model.max_text_length, window, c.data.sample_rate)

    @property
    def num_tokens(self) -> int:
        return int(self.params["codebooks"].shape[0])

    @property
    def codebook_size(self) -> int:
        return int(self.params["codebooks"].shape[1])

    def audio_embedding_fn(self, params: Any, audio: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, T] (T ≥ one window) → [B, D]: the unit-norm mean embedding over whole windows; with a sample
        mask [B, T], over the windows holding a valid patch, each embedded from its valid patches."""
        b, t = audio.shape
        n = max(1, t // self.window)
        width = self.window if t >= self.window else t
        windows = audio[:, : n * width].reshape(b * n, width)
        masks = None if mask is None else mask[:, : n * width].reshape(b * n, width)
        emb = self.model.apply({"params": params["mulan"]}, windows, masks, method=MuLan.embed_audio)
        emb = emb.reshape(b, n, emb.shape[-1])
        if masks is None:
            return l2_normalize(emb.mean(1))
        weight = valid_frames(self.model, masks, 1, self.model.patch_frames)[:, 0].reshape(b, n).astype(jnp.float32)
        weight = jnp.where(weight.any(-1, keepdims=True), weight, 1.0)[..., None]
        return l2_normalize((emb * weight).sum(1) / weight.sum(1))

    def audio_tokens_fn(self, params: Any, audio: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """[B, T] → int32 [B, Q]: RVQ of the audio embedding (over the valid samples of `mask`)."""
        return mulan_tokens(params["codebooks"], self.audio_embedding_fn(params, audio, mask))

    def text_embedding_fn(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        return self.model.apply({"params": params["mulan"]}, tokens, mask, method=MuLan.embed_text)

    def text_tokens_fn(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """Byte tokens [B, L] and their mask → int32 [B, Q]: RVQ of the text embedding."""
        return mulan_tokens(params["codebooks"], self.text_embedding_fn(params, tokens, mask))

    @functools.cached_property
    def _jitted(self) -> dict[str, Any]:
        return {"audio_tokens": jax.jit(self.audio_tokens_fn), "audio_embeddings": jax.jit(self.audio_embedding_fn),
                "text_tokens": jax.jit(self.text_tokens_fn), "text_embeddings": jax.jit(self.text_embedding_fn)}

    def text_tokens(self, prompts: Sequence[str]) -> jax.Array:
        return self._jitted["text_tokens"](self.params, *text_tokenize(list(prompts), self.max_text_length))

    def text_embeddings(self, prompts: Sequence[str]) -> jax.Array:
        return self._jitted["text_embeddings"](self.params, *text_tokenize(list(prompts), self.max_text_length))

    def audio_tokens(self, audio: jax.Array) -> jax.Array:
        return self._jitted["audio_tokens"](self.params, jnp.asarray(audio, jnp.float32))

    def audio_embeddings(self, audio: jax.Array) -> jax.Array:
        return self._jitted["audio_embeddings"](self.params, jnp.asarray(audio, jnp.float32))
