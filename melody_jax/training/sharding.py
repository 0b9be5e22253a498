"""Meshes, logical-axis rules and host→global batches: the only place that knows mesh axis names.

Models name their axes logically (`batch`, `embed`, `heads`, ...); the config's
`sharding_rules` map those names to the mesh axes `data`, `fsdp`, `tensor`. Rules are applied in
order and a mesh axis is never used twice in one array, so listing `batch` first lets `embed`
shard parameters over `fsdp` while activations keep `embed` whole (the FSDP pattern).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec

from melody_jax.training.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = tuple[tuple[str, Any], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("latent", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("kernel", None),
)


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int | None = None) -> dict[str, int]:
    """Resolves a `{axis: size}` dict with at most one -1 ("fill") against the device count."""
    n = jax.device_count() if num_devices is None else num_devices
    unknown = set(mesh_config) - set(MESH_AXES)
    if unknown:
        raise ConfigError(f"config.mesh has unknown axes {sorted(unknown)}; allowed: {MESH_AXES}")
    sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ConfigError(f"config.mesh: at most one axis may be -1, got {fill}")
    if any(s == 0 or s < -1 for s in sizes.values()):
        raise ConfigError(f"config.mesh sizes must be positive or -1, got {sizes}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if fill:
        if n % known:
            raise ConfigError(f"config.mesh={sizes}: {n} devices are not divisible by {known}")
        sizes[fill[0]] = n // known
    if math.prod(sizes.values()) != n:
        raise ConfigError(f"config.mesh={sizes} needs {math.prod(sizes.values())} devices, have {n}")
    return sizes


def make_mesh(mesh_config: Mapping[str, int]) -> jax.sharding.Mesh:
    """A `data × fsdp × tensor` mesh with Auto axis types (Linen's tensor-parallel code needs Auto)."""
    sizes = mesh_shape(mesh_config)
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
    )


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> Rules:
    """Config rules are lists (JSON-friendly); flax wants tuples of (name, axis-or-tuple-or-None)."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for rule in rules:
        name, axes = rule
        if isinstance(axes, (list, tuple)):
            axes = tuple(axes)
            bad = [a for a in axes if a not in MESH_AXES]
        else:
            bad = [] if axes is None or axes in MESH_AXES else [axes]
        if bad:
            raise ConfigError(f"config.sharding_rules: {name!r} maps to unknown mesh axes {bad}")
        out.append((str(name), axes))
    return tuple(out)


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
    """Both are needed: without the rules, logical constraints silently do nothing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def logical_sharding(mesh: jax.sharding.Mesh, rules: Rules, names: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, nn.logical_to_mesh_axes(tuple(names), rules))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over data×fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: jax.sharding.Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def host_to_global(batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch (leading dim = this host's share) → global arrays sharded on batch.

    Every host passes its own rows; the global batch is their concatenation in process order.
    """
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        sharding = batch_sharding(mesh, value.ndim)
        global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch that belong to this process (equal contiguous shares)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch {global_batch_size} is not divisible by {n} processes")
    per = global_batch_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)
