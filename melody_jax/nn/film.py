"""FiLM: feature-wise affine modulation of x by a conditioning vector m."""
from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.init import dense


class FiLM(nn.Module):
    """FiLM(x, m) = γ(m) ⊙ x + β(m), with γ(m) = 1 + W_γ m + b_γ so that it starts as the identity.

    x: [..., N, D]; m: [..., D_m] broadcast over N (pass m[..., None, :] to modulate per row).
    """

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, m: jnp.ndarray) -> jnp.ndarray:
        d = x.shape[-1]
        gb = dense(2 * d, ("embed", "mlp"), self.dtype, use_bias=True,
                   kernel_init=nn.initializers.zeros, name="proj")(m)
        gamma, beta = jnp.split(gb, 2, axis=-1)
        return ((1.0 + gamma) * x + beta).astype(self.dtype)
