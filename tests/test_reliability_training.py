"""Training under faults: Inf/NaN in inputs, loss and gradients; damaged or foreign checkpoints;
torn metric logs; diverging runs from the CLI; determinism across processes.

test_training.py already covers NaN through the loss, the NaN storm message, SIGTERM, a checkpoint of
a different architecture and the unwritable workdir; these tests cover what it does not.
"""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline.indexed import IndexedBatches
from melody_jax.tasks.toy_lm import ToyLMTask
from melody_jax.training.checkpoint import Checkpointer, check_compatible
from melody_jax.training.errors import TrainingDiverged, WorkdirError
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import guarded, init_sharded_state, sharded_abstract_state, train
from melody_jax.training.metrics import MetricsWriter, read_metrics
from melody_jax.training.sharding import activate, config_rules, make_mesh
from tests.helpers import PoisonedToyLM, run_cli, toy_config

pytestmark = pytest.mark.slow  # faulty trainings and CLI runs


@jax.custom_vjp
def _scale_grad(x: jax.Array, s: jax.Array) -> jax.Array:
    """x in the forward pass; the cotangent times s in the backward pass (NaN/Inf only in gradients)."""
    return x


_scale_grad.defvjp(lambda x, s: (x, s), lambda s, g: (g * s, jnp.zeros_like(s)))


class FaultyTask(PoisonedToyLM):
    """Injects faults by batch index: `loss_bad` adds a value to the loss through the batch (an input),
    `grad_bad` multiplies only the gradients by it; `hide_grad_norm` drops grad_norm from the metrics."""

    loss_bad: dict = {}
    grad_bad: dict = {}
    hide_grad_norm = False

    def train_iterator(self, mesh):
        clean = self.batches(mesh, "train").make_batch

        def make(index: int) -> dict[str, np.ndarray]:
            batch = clean(index)
            n = len(batch["tokens"])
            return {**batch, "poison": np.full((n,), self.loss_bad.get(index, 0.0), np.float32),
                    "grad_scale": np.full((n,), self.grad_bad.get(index, 1.0), np.float32)}

        return IndexedBatches(make, self.config.train.batch_size, mesh)

    def loss(self, params, batch, rng, train=True):
        loss, metrics = super().loss(params, batch, rng, train)
        if "grad_scale" in batch:
            loss = _scale_grad(loss, batch["grad_scale"].mean())
        return loss, metrics

    def train_step(self, state, batch, rng):
        state, metrics = super().train_step(state, batch, rng)
        if self.hide_grad_norm:
            metrics = {k: v for k, v in metrics.items() if k != "grad_norm"}
        return state, metrics


def restore(config, workdir, step: int, task=None):
    mesh = make_mesh(config.mesh)
    rules = config_rules(config)
    ckpt = Checkpointer(str(workdir), keep=100, every=1)
    try:
        with activate(mesh, rules):
            abstract, _ = sharded_abstract_state(task or ToyLMTask(config), mesh, rules, jax.random.key(0))
            state, _ = ckpt.restore(step, abstract)
        return jax.device_get(state)
    finally:
        ckpt.close()


def tree_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b)))


def test_inf_input_and_nan_or_inf_gradients_are_skipped_and_counted(tmp_path):
    """Step i+1 uses batch i: step 3 has an Inf input (loss +inf), steps 5 and 6 finite losses with
    NaN and Inf gradients."""
    config = toy_config({"train.num_steps": 8, "train.checkpoint_every": 1, "train.keep_checkpoints": 20})
    task = FaultyTask(config)
    task.loss_bad, task.grad_bad = {2: np.inf}, {4: np.nan, 5: np.inf}
    summary = train(task, str(tmp_path))
    log = {m["step"]: m for m in read_metrics(tmp_path)}
    assert summary["status"] == "done" and summary["bad_steps"] == 3
    assert [log[s]["bad_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 2, 3, 3, 3]
    assert [log[s]["bad_streak"] for s in range(1, 9)] == [0, 0, 1, 0, 1, 2, 0, 0]
    assert log[3]["loss"] == "inf" and np.isfinite(log[5]["loss"]) and np.isfinite(log[6]["loss"])
    s2, s3, s4, s6, s7 = (restore(config, tmp_path, s, task) for s in (2, 3, 4, 6, 7))
    assert tree_equal((s2.params, s2.opt_state), (s3.params, s3.opt_state)), "the Inf-input step changed the state"
    assert tree_equal((s4.params, s4.opt_state), (s6.params, s6.opt_state)), "NaN/Inf-gradient steps changed it"
    assert not tree_equal(s6.params, s7.params)  # the next clean step updates again
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(s7.params))


def test_guard_catches_bad_gradients_a_task_does_not_report():
    """A task without `grad_norm` in its metrics (a multi-optimizer stage may omit it): the guard's
    own check of the new parameters must still skip NaN or Inf gradient updates and count them."""
    config = toy_config({"optim.warmup_steps": 0})
    task = FaultyTask(config)
    task.hide_grad_norm = True
    mesh = make_mesh(config.mesh)
    rules = config_rules(config)
    with activate(mesh, rules):
        shardings = sharded_abstract_state(task, mesh, rules, jax.random.key(0))[1]
        state = init_sharded_state(task, shardings, jax.random.key(0))
        batch = task.train_iterator(mesh).make_batch(0)
        step = jax.jit(guarded(task, jax.random.key(1)))
        before = jax.device_get(state)
        runs = {scale: step(state, {**batch, "grad_scale": np.full_like(batch["grad_scale"], scale)})
                for scale in (1.0, np.nan, np.inf)}
    for scale in (np.nan, np.inf):
        bad, metrics = runs[scale]
        assert "grad_norm" not in metrics and np.isfinite(float(metrics["loss"]))
        assert int(metrics["bad_steps"]) == int(metrics["bad_streak"]) == 1 and int(bad.step) == 1
        assert tree_equal(jax.device_get((bad.params, bad.opt_state)), (before.params, before.opt_state))
    good, metrics = runs[1.0]
    assert int(metrics["bad_steps"]) == 0 and not tree_equal(jax.device_get(good.params), before.params)


def test_nan_storm_keeps_the_last_good_parameters_in_the_checkpoint(tmp_path):
    """Batches 6+ poison the gradients only; the run stops at the K-th bad step (9) and the checkpoint
    written during the storm (8) holds the parameters of the last good step (6), restorable."""
    config = toy_config({"train.num_steps": 30, "train.max_bad_steps": 3, "train.checkpoint_every": 2,
                         "train.keep_checkpoints": 10})
    task = FaultyTask(config)
    task.grad_bad = {i: np.nan for i in range(6, 30)}
    with pytest.raises(TrainingDiverged, match=r"^training stopped at step 9: 3 consecutive non-finite steps") as e:
        train(task, str(tmp_path))
    assert "\n" not in str(e.value) and str(e.value).endswith("the last checkpoint (step 8) are intact")
    ckpt = Checkpointer(str(tmp_path), keep=10, every=2)
    steps = list(ckpt.manager.all_steps())
    ckpt.close()
    assert steps == [1, 2, 4, 6, 8], steps  # the first step and the periodic saves; the stop adds none
    good, stormy = restore(config, tmp_path, 6, task), restore(config, tmp_path, 8, task)
    assert tree_equal((stormy.params, stormy.opt_state), (good.params, good.opt_state))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(stormy.params))
    assert int(stormy.step) == 8 and int(stormy.bad_streak) == 2 and int(good.bad_steps) == 0


def test_diverging_cli_run_stops_with_one_line_naming_the_step(tmp_path):
    """lr=1e30 makes every loss after step 1 non-finite; the CLI exits 2 with one line, no traceback."""
    out = run_cli("launch.train", "--config=configs/toy_lm.py:tiny", f"--workdir={tmp_path}",
                  "--config.optim.lr=1e30", "--config.optim.warmup_steps=0", "--config.train.max_bad_steps=3",
                  "--config.train.checkpoint_every=1", "--config.train.tensorboard=False", timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    # step 4's line is logged before step 4 could be saved, so the last checkpoint is step 3's
    assert errors == ["error: training stopped at step 4: 3 consecutive non-finite steps (loss or gradients); "
                      "they were skipped, so the parameters and the last checkpoint (step 3) are intact"]


def _damage(path: str) -> None:
    """Truncates every data file under a checkpoint's state item to half its size."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            full = os.path.join(dirpath, name)
            size = os.path.getsize(full)
            if size > 64:
                with open(full, "r+b") as f:
                    f.truncate(size // 2)


def test_damaged_checkpoints_give_one_line_errors(tmp_path):
    config = toy_config({"train.num_steps": 4, "train.checkpoint_every": 2})
    train(get_task(config), str(tmp_path / "run"))
    again = toy_config({"train.num_steps": 6, "train.checkpoint_every": 2})
    for what, damage, message in [
        ("state", lambda d: _damage(os.path.join(d, "state")), r"checkpoint .*/4 could not be restored: "),
        ("meta", lambda d: open(os.path.join(d, "meta", "metadata"), "w").write('{"stage": "toy'),
         r"checkpoint .*/4 could not be read: "),
        ("no meta", lambda d: shutil.rmtree(os.path.join(d, "meta")), r"checkpoint .*/4 could not be read: "),
    ]:
        workdir = tmp_path / what.replace(" ", "_")
        shutil.copytree(tmp_path / "run", workdir)
        damage(str(workdir / "checkpoints" / "4"))
        with pytest.raises(WorkdirError, match=message) as e:
            train(get_task(again), str(workdir))
        assert "\n" not in str(e.value) and "delete that step directory" in str(e.value), what
        assert read_metrics(workdir) == read_metrics(tmp_path / "run"), "a refused resume must not touch the log"
    # Following the message's advice resumes from the earlier complete checkpoint (2), also when an
    # older one (1) was half deleted by a kill during Orbax's keep-last-N cleanup.
    assert sorted(os.listdir(tmp_path / "state" / "checkpoints")) == ["1", "2", "4"]
    shutil.rmtree(tmp_path / "state" / "checkpoints" / "4")
    shutil.rmtree(tmp_path / "state" / "checkpoints" / "1" / "state")
    assert train(get_task(again), str(tmp_path / "state"))["step"] == 6
    assert [m["step"] for m in read_metrics(tmp_path / "state")] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(tmp_path / "state" / "checkpoints")) == ["2", "4", "6"]  # keep-last-3 pruned 1


def test_checkpoint_of_another_stage_is_refused():
    """check_compatible's stage branch (the architecture branch is in test_training.py)."""
    signature = {"embedding": [64, 64]}
    with pytest.raises(WorkdirError) as e:
        check_compatible({"stage": "dpd", "param_signature": signature}, "toy_lm", signature, "workdir /w")
    assert str(e.value) == "workdir /w holds a checkpoint of stage 'dpd', not 'toy_lm'; use another --workdir"
    with pytest.raises(WorkdirError, match=r"parameter head/kernel has shape None there and \[64, 64\] in this"):
        check_compatible({"stage": "toy_lm", "param_signature": signature}, "toy_lm",
                         {**signature, "head/kernel": [64, 64]}, "workdir /w")


def test_unwritable_workdir_is_one_cli_line_before_any_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = run_cli("launch.train", "--config=configs/toy_lm.py:tiny", f"--workdir={blocker}/run", timeout=300)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: workdir {blocker}/run is not writable: ")
    assert "parameters:" not in out.stderr  # it stopped before building the model


def test_torn_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path):
    """kill -9 can leave half a JSON line; resuming must not crash on it and must keep the good lines."""
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 4, "lo')
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=3)
    writer.write(4, {"loss": 0.25})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                                      {"step": 3, "loss": 1 / 3}, {"step": 4, "loss": 0.25}]
    assert not os.path.exists(tmp_path / "metrics.jsonl.tmp")


def test_same_seed_same_losses_across_processes(tmp_path):
    """A CLI run and an in-process run with one seed log identical metrics, bit for bit; another seed
    starts from another loss."""
    out = run_cli("launch.train", "--config=configs/toy_lm.py:tiny", "--config.train.num_steps=6",
                  "--config.train.log_every=1", "--config.train.tensorboard=False",
                  "--config.train.progress_bar=False", f"--workdir={tmp_path / 'cli'}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    train(get_task(toy_config({"train.num_steps": 6})), str(tmp_path / "here"))
    a, b = read_metrics(tmp_path / "cli"), read_metrics(tmp_path / "here")
    assert [m["step"] for m in a] == list(range(1, 7))
    keys = ("loss", "grad_norm", "accuracy", "eval_loss")
    assert [[m.get(k) for k in keys] for m in a] == [[m.get(k) for k in keys] for m in b]
    train(get_task(toy_config({"train.num_steps": 6, "train.stop_at_step": 1, "seed": 1})), str(tmp_path / "seed1"))
    assert read_metrics(tmp_path / "seed1")[0]["loss"] != a[0]["loss"]
