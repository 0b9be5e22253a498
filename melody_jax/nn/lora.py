"""LoRA adapters inside the shared `Dense`: low-rank updates of chosen kernels beside a frozen base.

Inside `adapting(LoRA(rank, alpha, patterns))` every `Dense` whose kernel path (`layer_0/attn/query/kernel`;
in a scanned stack `layers/attn/query/kernel`) matches one of the fnmatch `patterns` owns `lora_a [in…, r]`
and `lora_b [r, out…]` and returns x·W + (α/r)·(x·A)·B. B starts at zero, so a fresh adapter model
equals its base. A and B carry the kernel's logical axes on their side (the rank axis stays whole), so
they shard like the kernel, and under `nn.scan` they stack on its `layers` axis like every parameter.

The spec reaches `Dense` through a context, as the logical-axis rules do, rather than through a field
of every module between a stage's model and its kernels: the models stay unaware of LoRA, and scanned
and unrolled stacks are matched by the same patterns. The tree helpers name the adapters by their
leaf names, for everyone who splits them from the base (checkpoints, `init_from`) or merges them.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
import math
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

ADAPTERS = ("lora_a", "lora_b")


@dataclasses.dataclass(frozen=True)
class LoRA:
    rank: int
    alpha: float
    patterns: tuple[str, ...]

    def matches(self, kernel_path: str) -> bool:
        return any(fnmatch.fnmatchcase(kernel_path, p) for p in self.patterns)

    def delta(self, module: nn.Module, x: jax.Array, axis: tuple[int, ...], names: tuple[str | None, ...],
              features: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
        """(α/r)·(x·A)·B of `module` (a Dense: x's `axis` dims contract with A's leading dims)."""
        n_in = len(axis)
        a_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                                  out_axis=n_in)
        a = module.param("lora_a", nn.with_logical_partitioning(a_init, names[:n_in] + (None,)),
                         tuple(x.shape[i] for i in axis) + (self.rank,), jnp.float32)
        b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + names[n_in:]),
                         (self.rank,) + features, jnp.float32)
        h = jax.lax.dot_general(x.astype(dtype), a.astype(dtype), ((axis, tuple(range(n_in))), ((), ())))
        y = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())))
        return (self.alpha / self.rank) * y


_ACTIVE: contextvars.ContextVar[LoRA | None] = contextvars.ContextVar("lora", default=None)


@contextlib.contextmanager
def adapting(spec: LoRA) -> Iterator[None]:
    """Models initialised or applied in this block have `spec`'s adapters."""
    token = _ACTIVE.set(spec)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def for_kernel(module: nn.Module) -> LoRA | None:
    """The active spec if it adapts `module`'s kernel, else None."""
    spec = _ACTIVE.get()
    return spec if spec is not None and spec.matches("/".join(module.path) + "/kernel") else None


def split(tree: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base, adapters) of a nested parameter dict (boxed, abstract or arrays); empty dicts dropped."""
    base: dict[str, Any] = {}
    adapters: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub_base, sub_adapters = split(value)
            if sub_base:
                base[key] = sub_base
            if sub_adapters:
                adapters[key] = sub_adapters
        else:
            (adapters if key in ADAPTERS else base)[key] = value
    return base, adapters


def is_adapter(path: tuple[Any, ...]) -> bool:
    """Whether a tree path (`jax.tree_util` keys) ends at an adapter leaf."""
    return bool(path) and getattr(path[-1], "key", None) in ADAPTERS


def merge(params: Mapping[str, Any], alpha: float) -> dict[str, Any]:
    """Plain parameters: each adapted kernel becomes W + (α/r)·A·B and its adapters are dropped.

    A scanned stack's kernels `[layers, in…, out…]` merge layer by layer (A `[layers, in…, r]`,
    B `[layers, r, out…]`)."""
    out = {k: merge(v, alpha) if isinstance(v, Mapping) else v for k, v in params.items() if k not in ADAPTERS}
    if "lora_a" in params:
        a, b, w = params["lora_a"], params["lora_b"], params["kernel"]
        lead = a.ndim + b.ndim - 2 - w.ndim  # stacked axes in front (nn.scan)
        rank = a.shape[-1]
        stack = math.prod(a.shape[:lead])
        delta = jnp.einsum("sir,sro->sio", a.reshape(stack, -1, rank), b.reshape(stack, rank, -1),
                           precision=jax.lax.Precision.HIGHEST)
        out["kernel"] = (w + (alpha / rank) * delta.reshape(w.shape)).astype(w.dtype)
    return out
