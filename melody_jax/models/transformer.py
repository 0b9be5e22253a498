"""LLaMA-style decoder: the toy LM now, the semantic LM (DESIGN §4.4) and MusicGen's backbone later.

Pre-norm blocks of RMSNorm → causal rotary self-attention → RMSNorm → SwiGLU, no biases.
`decode=True` switches every attention layer to its KV cache (see `melody_jax.nn.attention`).
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.attention import Attention
from melody_jax.nn.init import dense, embed_tokens
from melody_jax.nn.mlp import SwiGLU
from melody_jax.nn.norms import RMSNorm
from melody_jax.nn.scan import layer_stack


class DecoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    decode: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        h = RMSNorm(dtype=self.dtype, name="attn_norm")(x)
        x = x + Attention(self.num_heads, dtype=self.dtype, decode=self.decode, implementation=self.attention_impl,
                          name="attn")(
            h, mask=mask, causal=True)
        h = RMSNorm(dtype=self.dtype, name="mlp_norm")(x)
        x = x + SwiGLU(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class DecoderLM(nn.Module):
    """tokens int32 [B, T] → logits float32 [B, T, output_size or vocab_size].

    `scan_layers`: the blocks as one `nn.scan` over parameters stacked on a leading `layers` axis
    (one block compiled instead of `num_layers`); same math, other parameter names (`layers/…`).
    """

    vocab_size: int
    num_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    decode: bool = False
    output_size: int | None = None  # head width when the model embeds more ids than it predicts
    scan_layers: bool = False
    attention_impl: str = "xla"

    @nn.compact
    def __call__(self, tokens: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
        x = embed_tokens(self, "embedding", tokens, self.vocab_size, self.embed_dim, self.dtype)
        if self.scan_layers:
            stack = layer_stack(DecoderBlock, self.num_layers, 1, self.remat)
            x, _ = stack(self.num_heads, self.mlp_dim, self.dtype, self.decode, self.attention_impl, name="layers")(
                x, mask)
        else:
            block = nn.remat(DecoderBlock) if self.remat else DecoderBlock
            for i in range(self.num_layers):
                x = block(self.num_heads, self.mlp_dim, self.dtype, self.decode, self.attention_impl,
                          name=f"layer_{i}")(x, mask)
        x = RMSNorm(dtype=self.dtype, name="final_norm")(x)
        logits = dense(self.output_size or self.vocab_size, ("embed", "vocab"), self.dtype, name="head")(x)
        return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
