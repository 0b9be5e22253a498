"""Dense layers and token embeddings whose weights carry logical axis names: the one way weights are made.

Our own small DenseGeneral: flax's flattens multi-axis kernels to 2-D inside the initializer, which
breaks logical-axis boxes under an active mesh; this one initialises the kernel in its real shape.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn import lora, skinny


class Dense(nn.Module):
    """Contracts x's `axis` dims with the kernel's leading dims; kernel axes are named `names`.

    Inside `lora.adapting(spec)` a kernel matched by the spec gets its low-rank adapter (`melody_jax/nn/lora.py`);
    inside `skinny.routing()` a product of a few float32 rows runs on the CPU kernel (`melody_jax/nn/skinny.py`)."""

    features: int | tuple[int, ...]
    names: tuple[str | None, ...]
    axis: int | tuple[int, ...] = -1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    kernel_init: Callable | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axis = tuple(a % x.ndim for a in axis)
        n_in, n_out = len(axis), len(features)
        if len(self.names) != n_in + n_out:
            raise ValueError(f"{self.name}: {len(self.names)} axis names for a {n_in + n_out}-d kernel")
        init = self.kernel_init or nn.initializers.variance_scaling(
            1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + n_out)))
        kernel = self.param("kernel", nn.with_logical_partitioning(init, self.names),
                            tuple(x.shape[a] for a in axis) + features, jnp.float32)
        if skinny.applies(x, kernel, axis, self.dtype):
            y = skinny.contract(x, kernel, n_in)
        else:
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                    ((axis, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.names[n_in:]),
                              features, jnp.float32)
            y = y + bias.astype(self.dtype)
        adapter = lora.for_kernel(self)  # after the base's parameters, so their initial values do not move
        if adapter is not None:
            y = y + adapter.delta(self, x, axis, self.names, features, self.dtype)
        return y


def dense(
    features: int | Sequence[int],
    names: Sequence[str | None],
    dtype: jnp.dtype = jnp.float32,
    *,
    axis: int | Sequence[int] = -1,
    use_bias: bool = False,
    kernel_init: Callable | None = None,
    name: str | None = None,
) -> Dense:
    features = features if isinstance(features, int) else tuple(features)
    axis = axis if isinstance(axis, int) else tuple(axis)
    return Dense(features, tuple(names), axis, use_bias, dtype, kernel_init, name=name)


def embed_tokens(module: nn.Module, name: str, tokens: jax.Array, vocab_size: int, dim: int,
                 dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """`tokens [B, L]` → `[B, L, dim]` rows of `module`'s N(0, 1) table parameter `name` [vocab_size, dim]
    (axes vocab × embed), from inside a compact method of `module`."""
    table = module.param(name, nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
                         (vocab_size, dim))
    return nn.with_logical_constraint(jnp.take(table, tokens, axis=0).astype(dtype), ("batch", "length", "embed"))
