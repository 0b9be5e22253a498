"""LoRA fine-tuning of any one-optimizer stage: its own model, with adapters in the matched `Dense` kernels.

`model.lora = {rank, alpha, patterns}` (rank 0 = off) switches on `melody_jax/nn/lora.py`'s adapters
around the stage's init, loss and evaluation. The base is the model being fine-tuned, so it comes
from `train.init_from` (required), and it stays frozen: `optax.multi_transform` gives the adapters
the stage's optimizer and every other leaf `set_to_zero` (no optimizer state), and the loss reads the
base behind `stop_gradient`, so none of its gradients is computed. Checkpoints hold the adapters
alone (with their optimizer state and EMA); the base is the `init_from` step recorded in their meta,
reloaded from there on resume and by `frozen.loader`, which merges both into plain weights.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from melody_jax.nn.lora import LoRA, adapting, is_adapter, split
from melody_jax.training.config import require
from melody_jax.training.state import overlay
from melody_jax.training.task import Batch, Metrics, Task


def rank(config: ml_collections.ConfigDict) -> int:
    """`model.lora.rank` (0 = off); configs written before LoRA existed have none."""
    lora = config.get("model", {}).get("lora")
    return int(lora.get("rank", 0)) if lora else 0


def spec(config: ml_collections.ConfigDict) -> LoRA:
    lora = config.model.lora
    return LoRA(int(lora.rank), float(lora.alpha), tuple(lora.patterns))


def with_adapters(init: Callable[[jax.Array], Any], config: ml_collections.ConfigDict) -> Callable[[jax.Array], Any]:
    """`init` of a stage's params, run with the adapters of `config.model.lora` in its matched kernels."""
    def init_with_adapters(rng: jax.Array) -> Any:
        with adapting(spec(config)):
            return init(rng)

    return init_with_adapters


def labels(params: Any) -> Any:
    """`optax.multi_transform`'s group of every leaf: "adapters" or "frozen"."""
    return jax.tree_util.tree_map_with_path(lambda path, _: "adapters" if is_adapter(path) else "frozen", params)


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

    @property
    def spec(self) -> LoRA:
        return spec(self.config)

    def validate(self) -> None:
        self.inner.validate()
        c, stage = self.config, self.config.stage
        lora = c.model.lora
        require(isinstance(lora.rank, int) and lora.rank > 0, f"config.model.lora.rank={lora.rank!r} must be > 0")
        require(isinstance(lora.alpha, (int, float)) and lora.alpha > 0,
                f"config.model.lora.alpha={lora.alpha!r} must be > 0")
        require(bool(lora.patterns) and all(isinstance(p, str) for p in lora.patterns),
                f"config.model.lora.patterns={lora.patterns!r} must be a non-empty list of kernel path patterns")
        require(type(self.inner).train_step is Task.train_step and type(self.inner).init_state is Task.init_state,
                f"config.model.lora: the {stage} stage has its own train step; LoRA applies to one-optimizer stages")
        require(bool(c.train.get("init_from")),
                "config.model.lora needs config.train.init_from: the trained stage (workdir or bundle) to fine-tune")
        abstract = nn.meta.unbox(jax.eval_shape(self.init_params, jax.random.key(0)))
        base, adapters = split(abstract)
        if not adapters:
            kernels = [jax.tree_util.keystr(p, simple=True, separator="/")
                       for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
            example = next((k for k in kernels if k.endswith("/kernel")), kernels[0] if kernels else "")
            require(False, f"config.model.lora.patterns={list(lora.patterns)!r} match no kernel of the {stage} "
                           f"stage (paths look like {example!r})")

    def init_params(self, rng: jax.Array) -> Any:
        return with_adapters(self.inner.init_params, self.config)(rng)

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        base, adapters = split(params)
        with adapting(self.spec):
            return self.inner.loss(overlay(jax.lax.stop_gradient(base), adapters), batch, rng, train)

    def eval_step(self, params: Any, batch: Batch, rng: jax.Array) -> Metrics:
        with adapting(self.spec):
            return self.inner.eval_step(params, batch, rng)

    def optimizer(self) -> optax.GradientTransformation:
        return optax.multi_transform({"adapters": self.inner.optimizer(), "frozen": optax.set_to_zero()}, labels)

    def checkpointed(self, params: Any) -> Any:
        return split(params)[1]

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        self.inner.setup(mesh)

    def train_iterator(self, mesh):
        return self.inner.train_iterator(mesh)

    def eval_iterator(self, mesh):
        return self.inner.eval_iterator(mesh)

    def describe(self, params: Any) -> dict[str, int]:
        trainable, total = count(split(params)[1]), count(params)
        line = f"LoRA: {trainable} trainable parameters of {total} ({100.0 * trainable / total:.2f} %)"
        logging.info(line)
        print(line, flush=True)
        return {"frozen": total - trainable, "lora (trainable)": trainable}


def wrap(task: Task) -> Task:
    """The task, wrapped for LoRA when its config asks for adapters."""
    return LoRATask(task) if rank(task.config) > 0 else task
