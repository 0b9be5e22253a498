"""RMSNorm: the normalisation of every LLaMA-style and Roformer block in the project."""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · scale, computed in float32 whatever the compute dtype."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],)
        )
        x32 = x.astype(jnp.float32)
        y = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon))
        return (y * scale).astype(self.dtype)
