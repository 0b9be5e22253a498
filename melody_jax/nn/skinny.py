"""A decode step's work on CPU (`decode_kernels.cc`): products of a few rows and cached attention at memory bandwidth.

XLA:CPU's dot reads a [K, N] weight at a fraction of the memory bandwidth when x has 2-8 rows, and a
decode step is nothing but such products; its attention reads the whole preallocated KV cache, masked.
Inside `routing()` (MusicGen's decode steps), `Dense` sends a float32 product of at most `MAX_ROWS` rows
to the product kernel, and self-attention of one query per row over its cache goes to the attention kernel,
which reads the cache only up to the decode index, when no mesh of more than one device is active;
`lax.platform_dependent` keeps XLA's ops on every other platform. The library is compiled on
first use with the host's C++ compiler (`-O3 -march=native`: AVX-512 where the CPU has it, portable
loops otherwise) into a cache keyed by the source, flags, compiler, CPU and jaxlib; without a compiler one
line says so and XLA's ops are used.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import math
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

MAX_ROWS = 8
SOURCE = pathlib.Path(__file__).with_name("decode_kernels.cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
TARGET = "melody_skinny_matmul"
ATTENTION_TARGET = "melody_cache_attention"

_ROUTING: contextvars.ContextVar[bool] = contextvars.ContextVar("skinny_routing", default=False)


@contextlib.contextmanager
def routing() -> Iterator[None]:
    """Products traced in this block that fit the kernel use it (see `applies`)."""
    token = _ROUTING.set(True)
    try:
        yield
    finally:
        _ROUTING.reset(token)


def cache_dir() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "melody-jax" / "kernels"


def _cpu() -> str:
    """The CPU's feature flags (Linux), since `-march=native` builds for them: a shared cache must not mix CPUs."""
    try:
        return next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), platform.processor())
    except OSError:
        return platform.processor()


def _compile(compiler: str) -> pathlib.Path:
    """The shared library for this source, flags, compiler, CPU and jaxlib, built once into `cache_dir()`."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *FLAGS, version, _cpu(), jax.__version__]).encode()).hexdigest()
    out = cache_dir() / f"decode_kernels-{key[:16]}.so"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, then renamed: safe for racers
            built = pathlib.Path(tmp) / out.name
            subprocess.run([compiler, *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", str(built)],
                           capture_output=True, text=True, check=True)
            os.replace(built, out)
    return out


@functools.cache
def available() -> bool:
    """Whether the kernels are built and registered with XLA (once per process; a failure is said once)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        print("warning: no C++ compiler (c++ or $CXX) on PATH: the decode kernels are off, XLA's ops are used",
              file=sys.stderr)
        return False
    try:
        library = ctypes.cdll.LoadLibrary(str(_compile(compiler)))
    except (OSError, subprocess.CalledProcessError) as error:
        detail = (getattr(error, "stderr", "") or str(error)).strip().splitlines()
        print(f"warning: the decode kernels did not build ({detail[-1] if detail else error}): "
              f"XLA's ops are used", file=sys.stderr)
        return False
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.MelodySkinnyMatmul), platform="cpu")
    jax.ffi.register_ffi_target(ATTENTION_TARGET, jax.ffi.pycapsule(library.MelodyCacheAttention), platform="cpu")
    return True


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """float32 x [M, K] @ w [K, N] with M <= MAX_ROWS: the kernel on CPU, XLA's dot elsewhere."""
    def kernel(x, w):
        return jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[1]), jnp.float32))(x, w)

    def dot(x, w):
        return jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)

    return jax.lax.platform_dependent(x, w, cpu=kernel, default=dot)


def _routed(*arrays: jax.Array) -> bool:
    """Inside `routing()`, float32 arrays, no mesh of more than one device, and the library available."""
    return (_ROUTING.get() and all(a.dtype == jnp.float32 for a in arrays)
            and jax.sharding.get_abstract_mesh().size <= 1 and available())


def applies(x: jax.Array, kernel: jax.Array, axis: tuple[int, ...], dtype: jnp.dtype) -> bool:
    """`_routed`, computed in float32, the contracted axes x's last ones, and 1 to MAX_ROWS rows."""
    rows = math.prod(x.shape[: x.ndim - len(axis)])
    return (jnp.dtype(dtype) == jnp.float32 and axis == tuple(range(x.ndim - len(axis), x.ndim))
            and 1 <= rows <= MAX_ROWS and _routed(x, kernel))


def attends(q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """`_routed`, and one query position (q [B, 1, H, D])."""
    return q.shape[1] == 1 and _routed(q, k, v)


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, length: jax.Array, scale: float,
                    default: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """q [B, 1, H, D] against a heads-major cache k, v [B, H, S, D] of which the first `length` positions
    are filled → [B, 1, H, D]: the kernel on CPU (reads those positions only), default(q, k, v, length) elsewhere."""
    def kernel(q, k, v, length):
        out = jax.ffi.ffi_call(ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape[:1] + q.shape[2:], jnp.float32))(
            q[:, 0], k, v, length.astype(jnp.int32), scale=np.float32(scale))
        return out[:, None]

    return jax.lax.platform_dependent(q, k, v, length, cpu=kernel, default=default)


def contract(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """x's last n_in axes contracted with kernel's first n_in (a multi-axis kernel read as [K, N])."""
    lead, features = x.shape[: x.ndim - n_in], kernel.shape[n_in:]
    k = math.prod(kernel.shape[:n_in])
    y = matmul(x.reshape(math.prod(lead), k), kernel.reshape(k, math.prod(features)))
    return y.reshape(lead + features)
