"""The machine's own ceilings, measured in the run that uses them: matmul peak and memory bandwidth.

MFU and roofline figures divide by these rather than by a datasheet, so a result from a shared
2-core CPU and one from an accelerator are each judged against what that machine can do.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.report import median_time


@functools.partial(jax.jit, static_argnames="inner")
def _chained_matmuls(a: jax.Array, b: jax.Array, inner: int) -> jax.Array:
    """`inner` dependent n×n products in one program, so dispatch cost is amortised on fast devices."""
    return jax.lax.fori_loop(0, inner, lambda _, x: x @ b, a)


def matmul_peak(dtype: jnp.dtype = jnp.float32, n: int = 2048, repeats: int = 5, inner: int = 4) -> float:
    """Achieved FLOP/s of square `dtype` matmuls (2n³ per product), median over `repeats`."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = (jax.random.normal(kb, (n, n), jnp.float32) / n**0.5).astype(dtype)  # keeps |x| ~ 1 along the chain
    seconds = median_time(lambda: _chained_matmuls(a, b, inner), warmup=1, repeats=repeats)
    return 2 * n**3 * inner / seconds


def memory_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Achieved bytes/s of a jitted `x + 1` over `nbytes` of float32, read and written (counts both).

    The input is donated so the output reuses its buffer: a fresh output on every call would measure
    first-touch page faults (2-3 GB/s on the 2-core CPU) rather than memory bandwidth.
    """
    step = jax.jit(lambda x: x + 1.0, donate_argnums=0)
    holder = {"x": jnp.zeros(nbytes // 4, jnp.float32)}

    def run() -> jax.Array:
        holder["x"] = step(holder["x"])
        return holder["x"]

    return 2 * nbytes / median_time(run, warmup=1, repeats=repeats)
