"""Scanned ↔ unscanned parameter layouts (`model.scan_layers`), converted by name.

Unscanned, a stack's blocks are siblings `<name>_0 … <name>_{n−1}`; scanned, one subtree (reached
through single-key levels such as the Conformer's `stack/layers`) holds them stacked on a leading
axis. `relayout` walks a tree and the target layout together and stacks or unstacks wherever the two
differ so, recursing into nested stacks; it works on arrays and on sharded `ShapeDtypeStruct`s (the
stacked axis unsharded), so a checkpoint written in one layout is restored in it and then converted.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from melody_jax.training.checkpoint import param_signature

_INDEXED = re.compile(r"^(.+)_(\d+)$")


class LayoutError(ValueError):
    """The two trees differ otherwise than by stacked layers."""


def _stack(leaves: list) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        sharding = first.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype, sharding=sharding)
    return (np if isinstance(first, np.ndarray) else jnp).stack(leaves)


def _take(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        sharding = leaf.sharding
        if isinstance(sharding, NamedSharding):
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)
    return leaf[i]


def _indexed(keys) -> tuple[str, list[str]] | None:
    """(name, [name_0, …, name_{n−1}]) when `keys` are exactly those; None when empty."""
    if not keys:
        return None
    found = [_INDEXED.match(k) for k in keys]
    names = {m.group(1) for m in found if m}
    if None in found or len(names) != 1 or sorted(int(m.group(2)) for m in found) != list(range(len(keys))):
        raise LayoutError(f"{sorted(keys)} are not one stack of indexed blocks")
    name = names.pop()
    return name, [f"{name}_{i}" for i in range(len(keys))]


def _descend(node: Mapping, block: Mapping) -> tuple[list[str], Any]:
    """Through the single-key levels a scanned stack may sit under: (their keys, the stacked subtree)."""
    path = []
    while isinstance(node, Mapping) and len(node) == 1 and next(iter(node)) not in block:
        key = next(iter(node))
        path.append(key)
        node = node[key]
    return path, node


def _nest(path: list[str], node: Any) -> Any:
    for key in reversed(path):
        node = {key: node}
    return node


def relayout(tree: Any, target: Any, where: str = "") -> Any:
    """`tree` in `target`'s layout (only `target`'s keys are read): blocks stacked or unstacked by name."""
    if not isinstance(target, Mapping):
        if isinstance(tree, Mapping):
            raise LayoutError(f"{where or '/'} is a subtree here and a parameter in the other layout")
        return tree
    if not isinstance(tree, Mapping):
        raise LayoutError(f"{where or '/'} is a parameter here and a subtree in the other layout")
    out = {k: relayout(tree[k], target[k], f"{where}/{k}") for k in tree if k in target}
    only_tree = [k for k in tree if k not in target]
    only_target = [k for k in target if k not in tree]
    if not only_tree and not only_target:
        return out
    if len(only_tree) == 1 and _indexed(only_target):  # scanned → unscanned
        (key,), (_, blocks) = only_tree, _indexed(only_target)
        path, stacked = _descend(tree[key], target[blocks[0]])
        for i, name in enumerate(blocks):
            out[name] = relayout(jax.tree.map(lambda x: _take(x, i), stacked), target[name], f"{where}/{name}")
        return out
    if len(only_target) == 1 and _indexed(only_tree):  # unscanned → scanned
        (key,), (_, blocks) = only_target, _indexed(only_tree)
        path, template = _descend(target[key], tree[blocks[0]])
        parts = [relayout(tree[name], template, f"{where}/{name}") for name in blocks]
        out[key] = _nest(path, jax.tree.map(lambda *xs: _stack(list(xs)), *parts))
        return out
    raise LayoutError(f"{where or '/'}: {sorted(only_tree)} here, {sorted(only_target)} in the other layout")


def from_signature(signature: Mapping[str, list[int]]) -> dict:
    """A checkpoint's `param_signature` ({'a/b': shape}) as a nested dict of shapes (a layout template)."""
    out: dict = {}
    for name, shape in signature.items():
        *parents, leaf = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tuple(shape)
    return out


def saved_layout(abstract_params: Any, signature: Mapping[str, list[int]] | None) -> Any | None:
    """`abstract_params` in the layout of a checkpoint's signature when that differs only by stacked
    layers; None when it is the same layout or not a relayout of it."""
    if not signature or param_signature(abstract_params) == dict(signature):
        return None
    try:
        other = relayout(abstract_params, from_signature(signature))
    except LayoutError:
        return None
    return other if param_signature(other) == dict(signature) else None


def relayout_trees(tree: Any, params: Any, target: Any, place: bool = False) -> Any:
    """Every subtree of `tree` shaped like `params` (the parameters, an EMA, Adam's moments) in
    `target`'s layout; other leaves (step counts) unchanged. `place`: arrays moved onto the shardings
    of `target`'s `ShapeDtypeStruct`s."""
    structure = jax.tree.structure(params)
    is_params = lambda x: isinstance(x, Mapping) and jax.tree.structure(x) == structure  # noqa: E731

    def convert(x):
        out = relayout(x, target)
        return jax.tree.map(lambda v, t: jax.device_put(v, t.sharding), out, target) if place else out

    return jax.tree.map(lambda x: convert(x) if is_params(x) else x, tree, is_leaf=is_params)
