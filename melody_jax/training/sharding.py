"""Meshes, logical-axis rules and host→global batches: the only place that knows mesh axis names.

Models name their axes logically (`batch`, `embed`, `heads`, ...); the config's
`sharding_rules` map those names to the mesh axes `data`, `fsdp`, `tensor`. Rules are applied in
order and a mesh axis is never used twice in one array, so listing `batch` first lets `embed`
shard parameters over `fsdp` while activations keep `embed` whole (the FSDP pattern).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
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

_UNSHARDED: Rules = (("length", None), ("kv", None), ("latent", None), ("kernel", None))
# `config.sharding.strategy` → rules. The mesh shape picks the sizes; a strategy whose axis has
# size 1 degrades gracefully (fsdp on a data-only mesh is data parallel).
STRATEGIES: dict[str, Rules] = {
    # every parameter whole on every device; the batch split over data×fsdp
    "dp": (("batch", BATCH_AXES),) + _UNSHARDED + tuple(
        (n, None) for n in ("embed", "mlp", "heads", "vocab", "conv_in", "conv_out")),
    # ZeRO-3: parameters and optimizer state split over fsdp along `embed`/`conv_in`, or, for arrays
    # without those, along their feature axis (rules apply in order; an axis is used once per array)
    "fsdp": (("batch", BATCH_AXES),) + _UNSHARDED + (
        ("embed", "fsdp"), ("conv_in", "fsdp"), ("mlp", "fsdp"), ("heads", "fsdp"), ("vocab", "fsdp"),
        ("conv_out", "fsdp")),
    # Megatron-style: heads, MLP hidden, vocabulary and output channels over tensor
    "tp": (("batch", BATCH_AXES),) + _UNSHARDED + (
        ("embed", None), ("conv_in", None), ("mlp", "tensor"), ("heads", "tensor"), ("vocab", "tensor"),
        ("conv_out", "tensor")),
    "fsdp_tp": DEFAULT_RULES,
}


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


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A `data × fsdp × tensor` mesh with Auto axis types (Linen's tensor-parallel code needs Auto),
    over all devices or the given ones (e.g. one device for small-batch sampling)."""
    sizes = mesh_shape(mesh_config, None if devices is None else len(devices))
    return jax.make_mesh(
        tuple(sizes[a] for a in MESH_AXES),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        **({} if devices is None else {"devices": devices}),
    )


def _parse_rule(rule: Sequence[Any]) -> tuple[str, Any]:
    name, axes = rule
    if isinstance(axes, (list, tuple)):
        axes = tuple(axes)
        bad = [a for a in axes if a not in MESH_AXES]
    else:
        bad = [] if axes is None or axes in MESH_AXES else [axes]
    if bad:
        raise ConfigError(f"config.sharding_rules: {name!r} maps to unknown mesh axes {bad}")
    return str(name), axes


def strategy_rules(strategy: str) -> Rules:
    if strategy not in STRATEGIES:
        raise ConfigError(f"config.sharding.strategy={strategy!r} must be one of {tuple(STRATEGIES)}")
    return STRATEGIES[strategy]


def rules_from_config(rules: Sequence[Sequence[Any]] | None, strategy: str = "fsdp_tp") -> Rules:
    """The strategy's rules with `rules` (JSON lists) overriding them by logical name, in place.

    Order matters (see the module docstring), so an overridden name keeps its position; new names go last.
    """
    base = strategy_rules(strategy)
    overrides = [_parse_rule(rule) for rule in rules or ()]
    names = {name for name, _ in overrides}
    out: list[tuple[str, Any]] = []
    for name, axes in base:
        if name not in names:
            out.append((name, axes))
        elif all(n != name for n, _ in out):
            out.extend(rule for rule in overrides if rule[0] == name)
    known = {name for name, _ in base}
    out.extend(rule for rule in overrides if rule[0] not in known)
    return tuple(out)


def config_mesh(config: Any) -> jax.sharding.Mesh:
    """The mesh of a stage config: `mesh` sizes over every device, or over the first
    `mesh_devices` of them when that is > 0 (one process only: a small run or a test on a big host)."""
    count = int(config.get("mesh_devices", 0) or 0)
    if count == 0:
        return make_mesh(config.mesh)
    if count < 0 or count > jax.device_count() or jax.process_count() > 1:
        raise ConfigError(f"config.mesh_devices={count} must be 0 (all) or at most the {jax.device_count()} "
                          "devices of a single process")
    return make_mesh(config.mesh, jax.devices()[:count])


def config_rules(config: Any) -> Rules:
    """Rules of a stage config: `sharding.strategy` (default fsdp_tp) overridden by `sharding_rules`."""
    sharding = config.get("sharding") or {}
    return rules_from_config(config.get("sharding_rules"), sharding.get("strategy", "fsdp_tp"))


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


def _mesh_axes_of(spec: PartitionSpec) -> set[str]:
    axes: set[str] = set()
    for entry in spec:
        axes.update(entry if isinstance(entry, tuple) else () if entry is None else (entry,))
    return axes


def assert_sharded(abstract_state: Any, config: Any, min_size: int | None = None) -> None:
    """Fails fast when FSDP was asked for and a parameter (or its optimizer state) of at least
    `min_size` elements (default `config.sharding.min_sharded_size`) would be whole on every fsdp device.

    `abstract_state` leaves carry `.shape` and a NamedSharding (`sharded_abstract_state`'s output).
    A silently replicated large array is the usual FSDP failure: the run works but needs fsdp× memory.
    """
    sharding = config.get("sharding") or {}
    strategy = sharding.get("strategy", "fsdp_tp")
    if strategy not in ("fsdp", "fsdp_tp"):
        return
    if min_size is None:
        min_size = int(sharding.get("min_sharded_size", 1 << 20))
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
        named = getattr(leaf, "sharding", None)
        if not isinstance(named, NamedSharding) or named.mesh.shape.get("fsdp", 1) == 1:
            continue
        size = math.prod(leaf.shape)
        if size >= min_size and "fsdp" not in _mesh_axes_of(named.spec):
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            raise ConfigError(
                f"config.sharding.strategy={strategy!r} but {name} {tuple(leaf.shape)} ({size} elements) is not "
                f"sharded over fsdp (spec {named.spec}); map one of its logical axes to 'fsdp' in "
                f"config.sharding_rules, or raise config.sharding.min_sharded_size above {size}")


def box_like_params(tree: Any, boxed_params: Any) -> Any:
    """`tree` (e.g. an optimizer's state of the unboxed parameters) with every leaf that is a per-parameter
    copy (its path ends with a parameter's path, same shape) boxed in that parameter's logical axes.

    The rest (step counters, scalars) stays unboxed, so replicated; placeholders without leaves (the
    `MaskedNode`s `optax.multi_transform` puts where a group's transform does not apply) get nothing.
    """
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    boxes = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(boxed_params, is_leaf=is_box)[0]
             if is_box(leaf)}
    lengths = sorted({len(p) for p in boxes}, reverse=True)

    def box(path, leaf):
        for n in lengths:
            param = boxes.get(tuple(path[len(path) - n:])) if len(path) >= n else None
            if param is not None and param.value.shape == leaf.shape:
                return param.replace_boxed(leaf)
        return leaf

    return jax.tree_util.tree_map_with_path(box, tree)


def sharded_shapes(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: jax.sharding.Mesh,
                   rules: Rules) -> tuple[Any, Any]:
    """(ShapeDtypeStructs carrying their shardings, the sharding tree) of `init_fn`'s boxed output,
    computed from shapes alone: nothing is materialised."""
    boxed = jax.eval_shape(init_fn, rng)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    unboxed = jax.tree.map(lambda a: a.value if isinstance(a, nn.meta.AxisMetadata) else a, boxed,
                           is_leaf=lambda a: isinstance(a, nn.meta.AxisMetadata))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), unboxed, shardings)
    return abstract, shardings
