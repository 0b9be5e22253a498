"""Feed-forward blocks: SwiGLU (LLaMA-style decoders) and GELU (DPD embeddings, encoders)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.init import dense


class SwiGLU(nn.Module):
    """W_down(silu(x W_gate) ⊙ x W_up), no biases, hidden width `mlp_dim`."""

    mlp_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        gate = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="gate")(x)
        up = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, name="up")(x)
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        return dense(x.shape[-1], ("mlp", "embed"), self.dtype, name="down")(h)


class GeluMLP(nn.Module):
    """W₂ GELU(x W₁ + b₁) + b₂ (exact GELU; biases optional); `out_dim` defaults to the input width."""

    mlp_dim: int
    out_dim: int | None = None
    dtype: jnp.dtype = jnp.float32
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        h = dense(self.mlp_dim, ("embed", "mlp"), self.dtype, use_bias=self.use_bias, name="fc1")(x)
        h = nn.gelu(h, approximate=False)
        return dense(self.out_dim or x.shape[-1], ("mlp", "embed"), self.dtype, use_bias=self.use_bias, name="fc2")(h)
