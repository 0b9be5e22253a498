"""LoRA fine-tuning of any one-optimizer stage: low-rank adapters on the shared `Dense` kernels.

`model.lora = {rank, alpha, patterns}`: every `kernel` whose path (`layer_0/attn/query/kernel`)
matches one of the fnmatch `patterns` gets `W + (alpha / rank) · A B`, A `[in…, r]` (Gaussian),
B `[r, out…]` (zeros, so the adapted model starts equal to the base). A multi-axis kernel splits
after its first axis when that axis is `embed` (q/k/v `[embed, heads, kv]`), else before its last
(out `[heads, kv, embed]`, MLP, convs): the model width is always one factor. A and B carry the
kernel's logical axes on their side, so they shard like it.

The adapters live beside the model's parameters as one more group, `params["lora"]`, mirroring the
kernels' paths; the task computes the merged kernels and runs the stage's own loss on them. The
base is behind `stop_gradient` and gets zero updates (`adapters_only`), so it stays bit for bit and
has no optimizer state; only the adapters train. `merge` gives plain weights for export.
"""
from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from melody_jax.training.config import require
from melody_jax.training.task import Batch, Metrics, Task

GROUP = "lora"


def rank(config: ml_collections.ConfigDict) -> int:
    """`model.lora.rank` (0 = off); configs written before LoRA existed have none."""
    lora = config.get("model", {}).get("lora")
    return int(lora.get("rank", 0)) if lora else 0


def _path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _split(names: tuple[str | None, ...], ndim: int) -> int:
    return 1 if ndim == 2 or names[0] == "embed" else ndim - 1


def _set(tree: dict, keys: list[str], value: Any) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def _get(tree: Any, keys: list[str]) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def adapters(base: Any, config: ml_collections.ConfigDict, rng: jax.Array) -> dict:
    """Boxed adapters `{path…: {"a", "b"}}` for the boxed kernels of `base` matched by the patterns."""
    lora = config.model.lora
    r = int(lora.rank)
    out: dict = {}
    flat = jax.tree_util.tree_flatten_with_path(base, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
    for i, (path, leaf) in enumerate(flat):
        name = _path(path)
        if not name.endswith("kernel") or not isinstance(leaf, nn.Partitioned) or leaf.value.ndim < 2:
            continue
        if not any(fnmatch.fnmatchcase(name, p) for p in lora.patterns):
            continue
        shape, names = leaf.value.shape, tuple(leaf.names)
        k = _split(names, len(shape))
        fan_in = math.prod(shape[:k])
        a = jax.random.normal(jax.random.fold_in(rng, i), shape[:k] + (r,), jnp.float32) / math.sqrt(fan_in)
        b = jnp.zeros((r,) + shape[k:], jnp.float32)
        keys = name.split("/")[:-1]
        _set(out, keys, {"a": nn.LogicallyPartitioned(a, names[:k] + (None,)),
                         "b": nn.LogicallyPartitioned(b, (None,) + names[k:])})
    return out


def with_adapters(init: Callable[[jax.Array], Any], config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
    """`init` of a stage's params, plus the adapters of `config.model.lora` as the group "lora"."""
    def init_with_adapters(rng: jax.Array) -> Any:
        base_rng, lora_rng = jax.random.split(rng)
        base = init(base_rng)
        return {**base, GROUP: adapters(base, config, lora_rng)}

    return init_with_adapters


def merge(params: Any, config: ml_collections.ConfigDict) -> Any:
    """Plain model parameters: every adapted kernel replaced by `W + (alpha / rank) · A B`."""
    lora = config.model.lora
    scale = float(lora.alpha) / int(lora.rank)
    base = {k: v for k, v in params.items() if k != GROUP}
    merged = jax.tree.map(lambda x: x, base)  # a fresh container tree to write into
    flat = jax.tree_util.tree_flatten_with_path(params.get(GROUP, {}), is_leaf=lambda x: isinstance(x, dict) and set(x) == {"a", "b"})[0]
    for path, ab in flat:
        keys = _path(path).split("/") + ["kernel"]
        w = _get(base, keys)
        delta = jnp.tensordot(ab["a"], ab["b"], axes=1)
        _set(merged, keys, (w + scale * delta).astype(w.dtype))
    return merged


def adapters_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` on `params["lora"]`, zero updates elsewhere; optimizer state for the adapters only.

    (What `optax.multi_transform` with `set_to_zero` does, without its MaskedNode placeholders,
    which the loop's logical-axis sharding of the state would read as leaves.)"""
    def init(params):
        return inner.init(params[GROUP])

    def update(updates, state, params=None):
        adapted, state = inner.update(updates[GROUP], state, None if params is None else params[GROUP])
        frozen = {k: jax.tree.map(jnp.zeros_like, v) for k, v in updates.items() if k != GROUP}
        return {**frozen, GROUP: adapted}, state

    return optax.GradientTransformation(init, update)


def count(tree: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


class LoRATask(Task):
    """The stage `inner` with only its LoRA adapters trained (anything it does not override: inner's)."""

    def __init__(self, inner: Task):
        super().__init__(inner.config)
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, item: str) -> Any:  # the stage's own helpers (model, iterators' settings, ...)
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(item)
        return getattr(inner, item)

    def validate(self) -> None:
        self.inner.validate()
        lora, stage = self.config.model.lora, self.config.stage
        require(isinstance(lora.rank, int) and lora.rank > 0, f"config.model.lora.rank={lora.rank!r} must be > 0")
        require(isinstance(lora.alpha, (int, float)) and lora.alpha > 0,
                f"config.model.lora.alpha={lora.alpha!r} must be > 0")
        require(bool(lora.patterns) and all(isinstance(p, str) for p in lora.patterns),
                f"config.model.lora.patterns={lora.patterns!r} must be a non-empty list of kernel path patterns")
        require(type(self.inner).train_step is Task.train_step and type(self.inner).init_state is Task.init_state,
                f"config.model.lora: the {stage} stage has its own train step; LoRA applies to one-optimizer stages")
        abstract = jax.eval_shape(self.inner.init_params, jax.random.key(0))
        matched = jax.eval_shape(lambda: adapters(abstract, self.config, jax.random.key(0)))
        require(bool(matched), f"config.model.lora.patterns={list(lora.patterns)!r} match no kernel of the {stage} "
                               f"stage (paths look like {_first_kernel(abstract)!r})")

    def init_params(self, rng: jax.Array) -> Any:
        return with_adapters(self.inner.init_params, self.config)(rng)

    def model_params(self, params: Any) -> Any:
        """The stage's parameters as its own code expects them: base (frozen) + adapters merged."""
        base = jax.lax.stop_gradient({k: v for k, v in params.items() if k != GROUP})
        return merge({**base, GROUP: params[GROUP]}, self.config)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        return self.inner.loss(self.model_params(params), batch, rng, train)

    def eval_step(self, params: Any, batch: Batch, rng: jax.Array) -> Metrics:
        return self.inner.eval_step(self.model_params(params), batch, rng)

    def optimizer(self) -> optax.GradientTransformation:
        return adapters_only(self.inner.optimizer())

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        self.inner.setup(mesh)

    def train_iterator(self, mesh):
        return self.inner.train_iterator(mesh)

    def eval_iterator(self, mesh):
        return self.inner.eval_iterator(mesh)

    def describe(self, params: Any) -> dict[str, int]:
        trainable, total = count(params[GROUP]), count(params)
        logging.info("LoRA: %d trainable parameters of %d (%.2f %%)", trainable, total, 100.0 * trainable / total)
        print(f"LoRA: {trainable} trainable parameters of {total} ({100.0 * trainable / total:.2f} %)", flush=True)
        return {"frozen": total - trainable, "lora (trainable)": trainable}


def _first_kernel(abstract: Any) -> str:
    names = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
    return next((n for n in names if n.endswith("kernel")), names[0] if names else "")


def wrap(task: Task) -> Task:
    """The task, wrapped for LoRA when its config asks for adapters."""
    return LoRATask(task) if rank(task.config) > 0 else task
