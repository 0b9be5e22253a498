"""The contract between a training stage and the generic loop (the loop knows no model).

A task joins a model to a loss and to its data. The default `train_step` is one optimizer over
`loss`; a task with several optimizers (the VAE-GAN) overrides `init_state` and `train_step`.
Iterators yield dicts of global `jax.Array`s only (host-side preprocessing such as caption
tokenisation happens inside the task's iterator) and expose `get_state()`/`set_state()` with a
small JSON-serialisable position, stored in every checkpoint.
"""
from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import ml_collections
import optax
from flax import linen as nn

from melody_jax.training import accumulate
from melody_jax.training.optim import make_optimizer
from melody_jax.training.sharding import box_like_params
from melody_jax.training.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class DataIterator(Protocol):
    def __iter__(self) -> Iterator[Batch]: ...
    def __next__(self) -> Batch: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


class Task(abc.ABC):
    """Base class of every stage; subclasses set `name` and implement the abstract parts."""

    name: str = ""
    fitted: bool = False  # FittingTask: no optimizer, batch size or gradient accumulation

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # --- what every stage implements -----------------------------------------------------------
    def validate(self) -> None:
        """Stage-specific config checks; raise ConfigError naming the field."""

    @abc.abstractmethod
    def init_params(self, rng: jax.Array) -> Any:
        """Boxed (logically partitioned) parameters, e.g. `module.init(...)["params"]`."""

    @abc.abstractmethod
    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        """(total loss, metrics); `train=False` for evaluation (no dropout, no CFG dropout)."""

    @abc.abstractmethod
    def train_iterator(self, mesh: jax.sharding.Mesh) -> DataIterator:
        """Endless batches for training, positioned by `set_state` on resume."""

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        """Loads the upstream stages this one reads (`config.upstream.<stage>`) onto `mesh`: called once by
        the loop and by `launch.plan`, before any iterator and any `loss`."""

    def eval_iterator(self, mesh: jax.sharding.Mesh) -> Iterator[Batch] | None:
        """A fresh finite iterator of held-out batches, or None for no evaluation."""
        return None

    # --- defaults: one optimizer over `loss` ---------------------------------------------------
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config.optim, self.config.train.num_steps)

    def init_state(self, rng: jax.Array) -> TrainState:
        """Boxed state: the optimizer's per-parameter state takes the params' logical axes (by path), so it
        shards alike, whatever placeholders the optimizer keeps (`optax.multi_transform`'s masked groups)."""
        params = self.init_params(rng)
        return TrainState.create(params, box_like_params(self.optimizer().init(nn.meta.unbox(params)), params))

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        """Must return metrics with the total `loss`; `grad_norm` if gradients exist."""
        (loss, metrics), grads = accumulate.value_and_grad(self.loss, state.params, batch, rng,
                                                           accumulate.steps(self.config))
        updates, opt_state = self.optimizer().update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(params=params, opt_state=opt_state), metrics

    def run_step(self, step_fn: Callable[[TrainState, Any], tuple[TrainState, Metrics]], state: TrainState,
                 train_it: DataIterator) -> tuple[TrainState, Metrics]:
        """One loop step: `step_fn` (the jitted, guarded `train_step`) on the next batch. A streamed fit
        overrides it to read a whole pass of its data first and hand `train_step` what the pass gathered."""
        return step_fn(state, next(train_it))

    def eval_step(self, params: Any, batch: Batch, rng: jax.Array) -> Metrics:
        loss, metrics = self.loss(params, batch, rng, train=False)
        return {**metrics, "loss": loss}

    def checkpointed(self, params: Any) -> Any:
        """The part of the parameters (and of their EMA) that checkpoints hold: all of them. A run that
        keeps some frozen (LoRA) holds the rest only; a resume rebuilds the frozen part as the run began."""
        return params

    def describe(self, params: Any) -> dict[str, int]:
        """Parameter count per top-level module, printed at start."""
        return {k: sum(x.size for x in jax.tree.leaves(v)) for k, v in params.items()}


class Passes(abc.ABC):
    """A fitting task's iterator: `next()` hands out a fresh pass (`chunks`, re-read from the start every
    time, one chunk in memory at a time); the checkpointed position is the number of passes handed out."""

    index = 0

    @abc.abstractmethod
    def chunks(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        """One pass of (x [N, D], weights [N]) chunks."""

    def __iter__(self) -> "Passes":
        return self

    def __next__(self) -> Callable[[], Iterator[tuple[jax.Array, jax.Array]]]:
        self.index += 1
        return self.chunks

    def get_state(self) -> dict[str, Any]:
        return {"index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


class FittingTask(Task):
    """A stage fitted by its own `train_step` (k-means iterations, RVQ levels) over all its data each
    step: no optimizer, no batch size, no gradients (configs/common.py `fitting_config`). Its state's
    params are what it fits, checkpointed and resumed like any stage's."""

    fitted = True

    def init_state(self, rng: jax.Array) -> TrainState:
        return TrainState.create(self.init_params(rng), ())

    @abc.abstractmethod
    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        """One fitting step; metrics with the `loss` the loop logs."""

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        raise TypeError(f"the {self.name} stage is fitted by its train_step; it has no loss to differentiate")
