"""The generic training loop on the toy LM: sharding, mesh invariance, resume, SIGTERM, NaN guard, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from data_pipeline.indexed import IndexedBatches
from melody_jax.tasks.toy_lm import ToyLMTask
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.training.errors import ConfigError, TrainingDiverged, WorkdirError
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import sharded_abstract_state, train
from melody_jax.training.metrics import read_metrics
from melody_jax.training.sharding import activate, make_mesh, rules_from_config
from tests.helpers import ROOT, PoisonedToyLM, cli_env, run_cli, toy_config

pytestmark = pytest.mark.slow  # trainings through the loop and the CLI

MESH_222 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def losses(workdir):
    return {m["step"]: m["loss"] for m in read_metrics(workdir) if "loss" in m}


@pytest.mark.learning
def test_sharded_training_learns_and_shards_params(tmp_path):
    config = toy_config({"train.num_steps": 50, **MESH_222})
    train(get_task(config), str(tmp_path))
    curve = losses(tmp_path)
    assert curve[1] - curve[50] > 1.5, f"loss fell only from {curve[1]:.3f} to {curve[50]:.3f} (want > 1.5 nats)"

    mesh = make_mesh(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    with activate(mesh, rules):
        abstract, _ = sharded_abstract_state(ToyLMTask(config), mesh, rules, jax.random.key(0))
        ckpt = Checkpointer(str(tmp_path), keep=3, every=1)
        try:
            state, _ = ckpt.restore(50, abstract)
        finally:
            ckpt.close()
    params = state.params
    assert params["embedding"].sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
    assert params["layer_0"]["mlp"]["gate"]["kernel"].sharding.spec == P("fsdp", "tensor")  # (embed, mlp)
    assert params["layer_0"]["attn"]["query"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
    assert params["layer_0"]["mlp"]["gate"]["kernel"].addressable_shards[0].data.shape == (32, 64)
    mu = state.opt_state[1][0].mu  # chain(clip, adamw) → adamw's ScaleByAdamState
    assert mu["layer_0"]["mlp"]["gate"]["kernel"].sharding.spec == P("fsdp", "tensor")
    assert mu["embedding"].sharding.spec == P("tensor", "fsdp")


def test_mesh_layout_does_not_change_the_math(tmp_path):
    dp = train(get_task(toy_config({"train.num_steps": 10, "mesh.data": 8})), str(tmp_path / "dp"))
    sharded = train(get_task(toy_config({"train.num_steps": 10, **MESH_222})), str(tmp_path / "222"))
    # the first device only
    one = train(get_task(toy_config({"train.num_steps": 10, "mesh_devices": 1})), str(tmp_path / "one"))
    a, b, c = losses(tmp_path / "dp"), losses(tmp_path / "222"), losses(tmp_path / "one")
    np.testing.assert_allclose([a[s] for s in range(1, 11)], [b[s] for s in range(1, 11)], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose([a[s] for s in range(1, 11)], [c[s] for s in range(1, 11)], rtol=2e-5, atol=2e-5)
    assert dp["status"] == sharded["status"] == one["status"] == "done"
    with pytest.raises(ConfigError, match=r"config.mesh_devices=9 must be 0 \(all\) or at most the 8 devices"):
        train(get_task(toy_config({"mesh_devices": 9})), str(tmp_path / "nine"))


def test_resume_continues_bit_for_bit(tmp_path):
    train(get_task(toy_config({"train.num_steps": 40, "train.checkpoint_every": 20})), str(tmp_path / "straight"))
    resumed = tmp_path / "resumed"
    first = train(get_task(toy_config({"train.num_steps": 40, "train.checkpoint_every": 20, "train.stop_at_step": 20})),
                  str(resumed))
    assert first["status"] == "stopped" and first["step"] == 20
    train(get_task(toy_config({"train.num_steps": 40, "train.checkpoint_every": 20})), str(resumed))
    a, b = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(b) == list(range(1, 41)), "the resumed log must be one trajectory without duplicates"
    assert [a[s] for s in range(21, 41)] == [b[s] for s in range(21, 41)]


def test_iterator_position_is_restored(tmp_path):
    config = toy_config()
    mesh = make_mesh(config.mesh)
    it = ToyLMTask(config).train_iterator(mesh)
    next(it), next(it)
    saved = it.get_state()
    expected = np.asarray(next(it)["tokens"])
    fresh = ToyLMTask(config).train_iterator(mesh)
    fresh.set_state(json.loads(json.dumps(saved)))
    np.testing.assert_array_equal(np.asarray(next(fresh)["tokens"]), expected)


class PoisonedTask(PoisonedToyLM):
    """Adds `poison` (NaN or 0) to chosen batches; the toy loss adds it, so those steps go non-finite."""

    bad_batches: set = set()

    def train_iterator(self, mesh):
        clean = self.batches(mesh, "train").make_batch

        def make(index):
            batch = clean(index)
            value = np.nan if index in self.bad_batches else 0.0
            return {**batch, "poison": np.full((len(batch["tokens"]),), value, np.float32)}

        return IndexedBatches(make, self.config.train.batch_size, mesh)


def test_nan_steps_are_skipped_and_counted(tmp_path):
    config = toy_config({"train.num_steps": 12, "train.checkpoint_every": 1, "train.keep_checkpoints": 20})
    task = PoisonedTask(config)
    task.bad_batches = {3, 4, 8}  # batch index i is used by step i + 1
    summary = train(task, str(tmp_path))
    log = {m["step"]: m for m in read_metrics(tmp_path)}
    assert summary["status"] == "done" and summary["bad_steps"] == 3
    assert [log[s]["bad_streak"] for s in (4, 5, 6, 9, 10)] == [1, 2, 0, 1, 0]
    assert log[4]["loss"] == "nan" and np.isfinite(log[12]["loss"])
    # a skipped update leaves parameters and optimizer state exactly as they were
    mesh = make_mesh(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    ckpt = Checkpointer(str(tmp_path), keep=20, every=1)
    with activate(mesh, rules):
        abstract, _ = sharded_abstract_state(task, mesh, rules, jax.random.key(0))
        (s3, _), (s5, _), (s6, _) = (ckpt.restore(s, abstract) for s in (3, 5, 6))
    ckpt.close()
    same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                        (s3.params, s3.opt_state), (s5.params, s5.opt_state))
    assert all(jax.tree.leaves(same)), "skipped steps 4-5 changed the state"
    assert not np.array_equal(np.asarray(s6.params["head"]["kernel"]), np.asarray(s5.params["head"]["kernel"]))


def test_nan_storm_stops_with_clear_message_and_keeps_checkpoint(tmp_path):
    config = toy_config({"train.num_steps": 30, "train.max_bad_steps": 4, "train.checkpoint_every": 5})
    task = PoisonedTask(config)
    task.bad_batches = set(range(7, 30))
    with pytest.raises(TrainingDiverged, match=r"stopped at step 11: 4 consecutive non-finite steps"):
        train(task, str(tmp_path))
    ckpt = Checkpointer(str(tmp_path), keep=3, every=5)
    assert ckpt.latest_step() is not None and ckpt.latest_step() <= 11
    ckpt.close()


def test_sigterm_saves_a_restorable_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, "-m", "launch.train", "--config=configs/toy_lm.py:tiny", f"--workdir={workdir}",
           "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000",
           "--config.train.log_every=1", "--config.train.tensorboard=False"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and len(read_metrics(workdir)) < 30:
        time.sleep(0.2)
    assert len(read_metrics(workdir)) >= 30, "training did not start in time"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err.decode()[-2000:]
    reached = max(losses(workdir))
    ckpt = Checkpointer(str(workdir), keep=3, every=1)
    assert ckpt.latest_step() == reached, f"latest checkpoint {ckpt.latest_step()} != step reached {reached}"
    config = toy_config()
    mesh = make_mesh(config.mesh)
    rules = rules_from_config(config.sharding_rules)
    with activate(mesh, rules):
        abstract, _ = sharded_abstract_state(ToyLMTask(config), mesh, rules, jax.random.key(0))
        state, data = ckpt.restore(reached, abstract)
    assert int(state.step) == reached and data == {"index": reached}
    ckpt.close()


@pytest.mark.parametrize("override, message", [
    ("--config.model.num_heads=7", "error: config.model.num_heads=7 does not divide embed_dim=64"),
    ("--config.train.batch_size=12", "error: config.train.batch_size=12 is not divisible by mesh data×fsdp=8"),
    ("--config.mesh.data=3", "error: config.mesh={'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, have 8"),
    ("--config.optim.schedule=linear", "error: config.optim.schedule='linear' must be one of"),
    ("--config.train.num_steps=0", "error: config.train.num_steps=0 must be > 0"),
])
def test_bad_config_is_one_line(tmp_path, override, message):
    out = run_cli("launch.train", "--config=configs/toy_lm.py:tiny", f"--workdir={tmp_path}", override)
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith(message), out.stderr[-1500:]
    assert "Traceback" not in out.stderr


def test_workdir_of_another_model_is_refused(tmp_path):
    train(get_task(toy_config({"train.num_steps": 2})), str(tmp_path))
    with pytest.raises(WorkdirError, match=r"checkpoint of a different model: parameter embedding has shape"):
        train(get_task(toy_config({"train.num_steps": 4, "model.embed_dim": 32})), str(tmp_path))
    assert json.load(open(tmp_path / "config.json"))["model"]["embed_dim"] == 64


def test_unwritable_workdir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(WorkdirError, match="is not writable"):
        train(get_task(toy_config()), str(blocker / "run"))


def test_config_json_and_metrics_contract(tmp_path):
    train(get_task(toy_config({"train.num_steps": 3})), str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["stage"] == "toy_lm" and saved["train"]["num_steps"] == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "3"]
    assert all({"step", "loss"} <= set(m) for m in read_metrics(tmp_path))
