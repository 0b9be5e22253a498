"""The one training loop: any task, any mesh; resumable, preemptible, NaN-guarded.

Order of work: validate → mesh → upstream stages (`Task.setup`) → shapes (`jax.eval_shape`) → shardings
→ restore or sharded init (`jax.jit(init, out_shardings=…)`) → jitted, donated step → log / eval / checkpoint.
Step k's metrics are read on the host while step k+1 runs, so logging never stalls the device; on a
checkpoint step they are read (and logged) before the save, which waits for that step anyway, so no
kill can leave a checkpointed step without its line. `holds_workdir`: one trainer per workdir.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import linen as nn
from tqdm import tqdm

from melody_jax.training import accumulate, ema, init_from, layer_layout
from melody_jax.training import config as config_lib
from melody_jax.training.checkpoint import Checkpointer, check_compatible, param_signature
from melody_jax.training.errors import ConfigError, TrainingDiverged, WorkdirError
from melody_jax.training.metrics import MetricsWriter, final_metrics, write_json_atomic
from melody_jax.training.sharding import (activate, assert_sharded, batch_divisor, config_mesh, config_rules,
                                          sharded_shapes)
from melody_jax.training.state import TrainState, overlay
from melody_jax.training.task import Task
from melody_jax.training.workdir_lock import holds_workdir


def prepare_workdir(workdir: str) -> None:
    """Fails before any compute if the workdir cannot take checkpoints."""
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}")
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None


def validate(task: Task) -> None:
    """The config's common fields, then the stage's own checks: one ConfigError naming the field."""
    config_lib.validate_common(task.config)
    check_task(task)


def check_task(task: Task) -> None:
    """The optimizer's fields (a stage trained by gradients), then the stage's own checks."""
    if not task.fitted:
        config_lib.validate_optimization(task.config)
    task.validate()


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Every (micro-)batch splits evenly over data × fsdp (a fitted stage has no batch size)."""
    if "batch_size" not in config.train:
        return
    k = accumulate.steps(config)
    if (config.train.batch_size // k) % batch_divisor(mesh):
        per = f" / grad_accum_steps={k}" if k > 1 else ""
        raise ConfigError(f"config.train.batch_size={config.train.batch_size}{per} is not divisible by "
                          f"mesh data×fsdp={batch_divisor(mesh)}")


def sharded_abstract_state(task: Task, mesh: jax.sharding.Mesh, rules, rng: jax.Array):
    """(abstract unboxed state with shardings, sharding tree) without materialising anything."""
    return sharded_shapes(lambda r: ema.attach(task.init_state(r), task.config), rng, mesh, rules)


def init_sharded_state(task: Task, shardings, rng: jax.Array) -> TrainState:
    return jax.jit(lambda r: nn.meta.unbox(ema.attach(task.init_state(r), task.config)),
                   out_shardings=shardings)(rng)


def start_state(task: Task, shardings, rng: jax.Array, source: init_from.Source | None, abstract) -> TrainState:
    """The state a run starts from: its sharded init, then the parameters of `train.init_from`."""
    state = init_sharded_state(task, shardings, rng)
    return state if source is None else init_from.load(source, state, abstract, task.config, shardings)


def checkpointed(task: Task, state: TrainState) -> TrainState:
    """What a checkpoint holds of `state`: `Task.checkpointed` of its parameters and of their EMA."""
    return state.replace(params=task.checkpointed(state.params),
                         ema=None if state.ema is None else task.checkpointed(state.ema))


def restore_checkpoint(ckpt: Checkpointer, step: int, saved: TrainState, config: ml_collections.ConfigDict,
                       where: str) -> tuple[TrainState, dict, dict]:
    """(state as checkpointed, its meta, data state) of checkpoint `step` for this run, refused in one line
    if it holds another model. `saved` is what this run checkpoints (`checkpointed`).

    One written with the other `model.scan_layers` is restored as written and its layers stacked or
    unstacked (parameters, EMA and optimizer moments alike), then placed on this run's shardings.
    """
    meta = ckpt.read_meta(step)
    other = layer_layout.saved_layout(saved.params, meta.get("param_signature"))
    written = saved if other is None else layer_layout.relayout_trees(saved, saved.params, other)
    check_compatible(meta, config.stage, param_signature(written.params), where, config.seed)
    state, data_state = ckpt.restore(step, ema.as_saved(written, meta))
    if other is not None:
        state = layer_layout.relayout_trees(state, other, saved.params, place=True)
    return state, meta, data_state


def guarded(task: Task, step_rng: jax.Array):
    """Wraps the task's step: a non-finite loss or gradient leaves the state as it was, counted."""

    decay = ema.decay(task.config)

    def step(state: TrainState, batch):
        new_state, metrics = task.train_step(state, batch, jax.random.fold_in(step_rng, state.step))
        new_state = ema.update(new_state, decay)
        finite = jnp.isfinite(metrics["loss"])
        if "grad_norm" in metrics:
            finite &= jnp.isfinite(metrics["grad_norm"])
        # Also the result itself: a task whose metrics carry no grad_norm (or whose gradients went
        # non-finite in a part the norm misses) must not write NaN into the parameters either.
        for leaf in jax.tree.leaves(new_state.params):
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                finite &= jnp.isfinite(leaf).all()
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        bad = jnp.logical_not(finite).astype(jnp.int32)
        kept = kept.replace(step=state.step + 1, bad_steps=state.bad_steps + bad,
                            bad_streak=jnp.where(finite, 0, state.bad_streak + 1))
        return kept, {**metrics, "bad_steps": kept.bad_steps, "bad_streak": kept.bad_streak}

    return step


class _Preemption:
    """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop saves at the current step and returns (exit code 0).
    A second Ctrl-C while it saves interrupts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self._previous: dict = {}

    def __enter__(self):
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread: the caller handles signals
            self._previous = {}
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("%s: saving at the end of this step", signal.Signals(signum).name)

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def _evaluate(task: Task, params, mesh, eval_fn, config, rng) -> dict[str, float]:
    it = task.eval_iterator(mesh)
    if it is None:
        return {}
    totals: dict[str, float] = {}
    n = 0
    for i, batch in zip(range(config.train.eval_batches), it):
        for k, v in jax.device_get(eval_fn(params, batch, jax.random.fold_in(rng, i))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        n += 1
    return {f"eval_{k}": v / max(n, 1) for k, v in totals.items()}


@holds_workdir
def train(task: Task, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the stage `task` (of `task.config`) in `workdir`; returns the final metrics.

    The task comes from `melody_jax.tasks.registry.get_task(config)` (tests may wrap it to inject faults).
    """
    config = task.config
    validate(task)
    prepare_workdir(workdir)
    mesh = config_mesh(config)
    rules = config_rules(config)
    check_batch(config, mesh)
    is_main = jax.process_index() == 0

    with activate(mesh, rules):
        task.setup(mesh)  # upstream stages, before any iterator
        init_rng, step_rng, eval_rng = jax.random.split(jax.random.key(config.seed), 3)
        abstract, shardings = sharded_abstract_state(task, mesh, rules, init_rng)
        assert_sharded(abstract, config)  # before any memory is spent on a layout that would not fit
        saved = checkpointed(task, abstract)
        signature = param_signature(saved.params)
        source = init_from.check(config, abstract.params) if init_from.requested(config) else None
        meta = {"stage": config.stage, "param_signature": signature, "seed": config.seed,
                "ema": abstract.ema is not None, **({"init_from": source.record()} if source else {})}
        ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints, every=config.train.checkpoint_every)
        train_it = task.train_iterator(mesh)
        latest = ckpt.latest_step()
        if latest is not None:
            try:
                state, saved_meta, data_state = restore_checkpoint(ckpt, latest, saved, config, f"workdir {workdir}")
                if jax.tree.structure(saved.params) != jax.tree.structure(abstract.params):
                    # the frozen rest, as this run began: its init, then the init_from step it recorded
                    fresh = start_state(task, shardings, init_rng, init_from.recorded(saved_meta, source, workdir),
                                        abstract)
                    keep_ema = state.ema is not None and fresh.ema is not None
                    state = state.replace(params=overlay(fresh.params, state.params),
                                          ema=overlay(fresh.ema, state.ema) if keep_ema else None)
                state = ema.match_config(state, config, shardings)
            except BaseException:
                ckpt.close()  # a refused workdir must not leave Orbax's threads behind
                raise
            train_it.set_state(data_state)
            logging.info("resumed from step %d", latest)
        else:
            state = start_state(task, shardings, init_rng, source, abstract)
            if is_main:
                counts = task.describe(state.params)
                logging.info("parameters: %s (total %d)", counts, sum(counts.values()))
        if is_main:  # only now: a refused workdir keeps the config of the run it holds
            with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
                f.write(config_lib.to_json(config))
            os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))
        start = int(jax.device_get(state.step))
        writer = MetricsWriter(workdir, enabled=is_main, tensorboard=config.train.tensorboard,
                               resume_step=latest)
        step_fn = jax.jit(guarded(task, step_rng), out_shardings=(shardings, None), donate_argnums=(0,))
        eval_fn = jax.jit(task.eval_step)
        summary: dict[str, Any] = {"step": start}
        try:
            summary = _run(task, config, mesh, state, start, train_it, step_fn, eval_fn, eval_rng,
                           ckpt, meta, writer, is_main)
        finally:
            ckpt.wait()
            ckpt.close()
            writer.close()
    if is_main:
        summary = final_metrics(workdir, summary)
        if summary.get("status") == "done":
            write_json_atomic(os.path.join(workdir, "final_metrics.json"), summary)
    return summary


def _run(task, config, mesh, state, start, train_it, step_fn, eval_fn, eval_rng, ckpt, meta, writer, is_main):
    num_steps = config.train.num_steps
    last_step = min(num_steps, config.train.stop_at_step or num_steps)
    log_every = config.train.log_every
    bar = tqdm(total=num_steps, initial=start, disable=not (is_main and config.train.progress_bar),
               desc=config.stage, dynamic_ncols=True)
    pending: tuple[int, Any] | None = None
    last: dict[str, float] = {}
    evals_at: dict[int, dict[str, float]] = {}
    tick, tick_step = time.perf_counter(), start

    def consume(step: int, metrics) -> None:
        nonlocal last, tick, tick_step
        extra = evals_at.pop(step, {})
        if step % log_every and step != last_step and not extra and int(metrics["bad_streak"]) == 0:
            return
        values = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
        if values["bad_streak"] >= config.train.max_bad_steps:
            bar.close()  # ends the bar's line, so the CLI's `error:` line starts a line of its own
            raise TrainingDiverged(
                f"training stopped at step {step}: {int(values['bad_streak'])} consecutive non-finite "
                f"steps (loss or gradients); they were skipped, so the parameters and the last "
                f"checkpoint (step {ckpt.latest_step()}) are intact")
        values.update(extra)
        if step % log_every == 0 or step == last_step or extra:
            now = time.perf_counter()
            values["steps_per_sec"] = (step - tick_step) / max(now - tick, 1e-9)
            if "batch_size" in config.train:
                values["examples_per_sec"] = values["steps_per_sec"] * config.train.batch_size
            tick, tick_step = now, step
            writer.write(step, values)
            bar.set_postfix(loss=f"{values['loss']:.4f}")
        last = values

    with _Preemption() as preemption:
        status = "done"
        for step in range(start + 1, last_step + 1):
            state, metrics = task.run_step(step_fn, state, train_it)
            if pending is not None:
                consume(*pending)
            pending = (step, metrics)
            bar.update(1)
            if step % config.train.eval_every == 0 or step == num_steps:
                evals_at[step] = _evaluate(task, ema.weights(state), mesh, eval_fn, config, eval_rng)
            if ckpt.should_save(step):  # a step's line is in the log before its checkpoint can commit
                consume(*pending)
                pending = None
            ckpt.save(step, checkpointed(task, state), train_it.get_state(), meta)
            stop = (ckpt.reached_preemption(step) if jax.process_count() > 1 else preemption.requested)
            if stop and step < num_steps:
                status = "preempted"
                break
        if status == "done" and last_step < num_steps:
            status = "stopped"
        if pending is not None:
            consume(*pending)
        final_step = int(jax.device_get(state.step))
        if ckpt.latest_step() != final_step:
            ckpt.save(final_step, checkpointed(task, state), train_it.get_state(), meta, force=True)
        bar.close()
    if status == "preempted":
        logging.warning("preempted: saved step %d", final_step)
    return {**last, "step": final_step, "status": status}
