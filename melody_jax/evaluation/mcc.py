"""MuLan cycle consistency (DESIGN §10): how well generated audio agrees with its prompt in MuLan space.

Only as good as our own MuLan: report it beside independent measures (musicnn tags), never alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def mulan_cycle_consistency(text_emb: jax.Array, audio_emb: jax.Array) -> jax.Array:
    """Mean cosine similarity of paired rows of text_emb [B, D] and audio_emb [B, D] (in [-1, 1])."""
    t = text_emb / jnp.maximum(jnp.linalg.norm(text_emb, axis=-1, keepdims=True), 1e-12)
    a = audio_emb / jnp.maximum(jnp.linalg.norm(audio_emb, axis=-1, keepdims=True), 1e-12)
    return jnp.mean(jnp.sum(t * a, axis=-1))
