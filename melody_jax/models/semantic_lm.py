"""Semantic LM (DESIGN §4.4): p(semantic tokens | 12 MuLan RVQ tokens), a LLaMA-style decoder.

The model reads one stream of raw codes: positions 0..11 hold MuLan codes (one 1024-code RVQ level
each), later positions hold semantic codes. It maps position q < 12 to embedding id 1024·q + code
and later positions to 12·1024 + code, so one table holds all 13 vocabularies, and it predicts only
semantic codes (1024 logits). Because the mapping follows the absolute position (kept in the
`cache` collection when decoding), samplers feed generated codes straight back in.

With `null_prefix`, the table has one more row per MuLan level, read where a prefix code is NULL_CODE: the
"no condition" prefix an LM trained with prefix dropout learns to continue, which classifier-free guidance
at sampling time contrasts with the prompt's (`pipelines.lm_sampling`; audiocraft's condition dropout).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from melody_jax.models.transformer import DecoderLM

NUM_MULAN_TOKENS = 12
MULAN_CODEBOOK_SIZE = 1024
SEMANTIC_VOCAB_SIZE = 1024
NULL_CODE = -1  # a prefix code: this level of the condition is absent (an LM with `null_prefix`)


def stream_ids(codes: jnp.ndarray, positions: jnp.ndarray, num_prefix: int, prefix_codebook_size: int,
               null_base: int | None = None) -> jnp.ndarray:
    """Raw codes [B, T] at absolute positions [T] → ids of the shared embedding table; with `null_base`,
    NULL_CODE at prefix level q → id null_base + q."""
    level = jnp.minimum(positions, num_prefix)  # prefix level q, or num_prefix for semantic codes
    ids = (level * prefix_codebook_size)[None, :] + codes
    if null_base is None:
        return ids
    return jnp.where((codes == NULL_CODE) & (positions < num_prefix)[None, :], null_base + level[None, :], ids)


class SemanticLM(nn.Module):
    """codes int32 [B, T] (MuLan codes, then semantic codes) → logits float32 [B, T, vocab_size].

    Logits at position p predict the semantic code at p + 1; a training stream starts at position 0.
    """

    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    num_prefix: int = NUM_MULAN_TOKENS
    prefix_codebook_size: int = MULAN_CODEBOOK_SIZE
    vocab_size: int = SEMANTIC_VOCAB_SIZE
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    decode: bool = False
    scan_layers: bool = False  # DecoderLM.scan_layers
    attention_impl: str = "xla"  # Attention.implementation
    null_prefix: bool = False  # num_prefix more table rows for NULL_CODE (trained by prefix dropout)

    @nn.compact
    def __call__(self, codes: jnp.ndarray) -> jnp.ndarray:
        t = codes.shape[1]
        start = 0
        if self.decode:  # the allocation pass (first init) leaves the position at 0, like the KV cache
            allocated = self.has_variable("cache", "position")
            position = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            start = position.value
            if allocated:
                position.value = start + t
        table = self.num_prefix * self.prefix_codebook_size + self.vocab_size
        ids = stream_ids(codes, start + jnp.arange(t), self.num_prefix, self.prefix_codebook_size,
                         table if self.null_prefix else None)
        return DecoderLM(
            vocab_size=table + self.num_prefix * self.null_prefix,
            output_size=self.vocab_size, num_layers=self.num_layers, embed_dim=self.embed_dim,
            num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype, remat=self.remat,
            decode=self.decode, scan_layers=self.scan_layers,
            attention_impl=self.attention_impl, name="decoder",
        )(ids)
