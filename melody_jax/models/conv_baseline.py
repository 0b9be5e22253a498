"""A 1-D convolutional velocity network: the backbone baseline of the DPD ablation (DESIGN §4.5).

Same interface and the same input embedding as `DPD` with `align_tokens`: Linear(z_noisy) + E_δ +
each frame's token embedding, so a comparison isolates the backbone (the DPD also cross-attends
to the tokens and FiLMs by their mean; a convolution cannot attend). The stack is residual,
pre-norm, with dilations doubling per layer (1, 2, 4, … then repeating) so its receptive field
grows quickly, like a UNet's would.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.models.dpd import embed_inputs, frame_tokens
from melody_jax.nn.init import dense
from melody_jax.nn.norms import RMSNorm


class ConvBlock(nn.Module):
    """x + W(GELU(Conv_k,dilated(RMSNorm(x)))): a residual dilated convolution."""

    kernel_size: int
    dilation: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        h = RMSNorm(dtype=self.dtype, name="norm")(x)
        h = nn.Conv(d, (self.kernel_size,), kernel_dilation=(self.dilation,), padding="SAME",
                    dtype=self.dtype, param_dtype=jnp.float32, name="conv",
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                             ("kernel", "conv_in", "conv_out")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))(h)
        h = dense(d, ("conv_out", "embed"), self.dtype, use_bias=True, name="mix")(nn.gelu(h))
        return x + h


class ConvBaseline(nn.Module):
    """(z_noisy [B, L, latent], δ [B, L], tokens [B, T_ST], uncond [B] | None) → v̂ float32 [B, L, latent]."""

    latent_dim: int = 16
    hidden_dim: int = 64
    num_layers: int = 8
    kernel_size: int = 5
    max_dilation: int = 8
    angle_dim: int = 256
    vocab_size: int = 1024
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, z_noisy: jax.Array, delta: jax.Array, tokens: jax.Array, uncond: jax.Array | None = None
    ) -> jax.Array:
        x, _, e_st = embed_inputs(self, z_noisy, delta, tokens)
        x = x + frame_tokens(e_st, z_noisy.shape[1], uncond)
        dilation = 1
        for i in range(self.num_layers):
            x = ConvBlock(self.kernel_size, dilation, self.dtype, name=f"conv_{i}")(x)
            dilation = 1 if dilation >= self.max_dilation else 2 * dilation
        y = RMSNorm(dtype=self.dtype, name="out_norm")(x)
        y = dense(self.latent_dim, ("embed", "latent"), self.dtype, use_bias=True, name="output")(y)
        return y.astype(jnp.float32)
