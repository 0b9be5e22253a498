"""launch.plan: the ahead-of-time memory and collective figures of a train step, nothing materialised."""
import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest

from melody_jax.frozen.inputs import FrozenInputs
from melody_jax.tasks.registry import get_task
from melody_jax.training.errors import ConfigError
from melody_jax.training.plan import _abstract_batch, count_collectives, plan_train_step
from tests.helpers import run_cli, stage_config, toy_config

TOY_PARAMS = 90_432  # toy_lm tiny (the loop logs the same count)


def test_fsdp_divides_parameter_memory_and_adds_gathers():
    dp = plan_train_step(get_task(toy_config({"sharding.strategy": "dp", "mesh.data": 8})))
    fsdp = plan_train_step(get_task(toy_config({"sharding.strategy": "fsdp", "mesh.data": 1, "mesh.fsdp": 8})))
    assert dp["num_params"] == fsdp["num_params"] == TOY_PARAMS
    assert dp["params_bytes"] == 4 * TOY_PARAMS and fsdp["params_bytes"] == 4 * TOY_PARAMS // 8
    for p in (dp, fsdp):  # Adam's mu and nu, plus a few step counters
        assert 0 <= p["opt_state_bytes"] - 2 * p["params_bytes"] <= 64
        assert p["temp_bytes"] > 0
        assert p["alias_bytes"] == p["argument_bytes"] - p["batch_bytes"]  # the donated state is updated in place
    assert dp["collectives"]["all-gather"] == 0 and dp["collectives"]["all-reduce"] >= 1  # gradients only
    assert fsdp["collectives"]["all-gather"] > 0  # parameters gathered for use


def test_collectives_are_counted_once_per_instruction():
    hlo = """
      %all-reduce-start.1 = f32[8] all-reduce-start(f32[8] %p), to_apply=%add
      %all-reduce-done.1 = f32[8] all-reduce-done(f32[8] %all-reduce-start.1)
      %all-gather.2 = f32[16] all-gather(f32[2] %q), dimensions={0}
      %reduce-scatter = f32[2] reduce-scatter(f32[16] %r), dimensions={0}
      %cp = (f32[2], f32[2]) collective-permute-start(f32[2] %s)
    """
    assert count_collectives(hlo) == {"all-reduce": 1, "all-gather": 1, "reduce-scatter": 1, "all-to-all": 0,
                                      "collective-permute": 1}


def test_cli_prints_memory_and_collectives_for_a_16_device_mesh():
    out = run_cli("launch.plan", "--config=configs/toy_lm.py:tiny", "--mesh=data=2,fsdp=4,tensor=2",
                  "--devices=16", "--config.train.batch_size=16", timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "mesh data=2, fsdp=4, tensor=2 (16 devices); strategy fsdp_tp" in text
    mib = {k: float(v) for k, v in re.findall(r"^  (parameters|optimizer state|activations/temp)\s+([\d.]+)$",
                                               text, re.M)}
    assert set(mib) == {"parameters", "optimizer state", "activations/temp"}, text
    assert mib["parameters"] > 0 and mib["activations/temp"] > 0
    assert abs(mib["optimizer state"] - 2 * mib["parameters"]) <= 0.002
    counts = dict(re.findall(r"(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute) (\d+)", text))
    assert len(counts) == 5 and int(counts["all-gather"]) > 0 and int(counts["all-reduce"]) > 0, text


def test_batches_carrying_frozen_parameters_are_planned_by_shape():
    """data.source=frozen_models / codec batches nest the frozen stages' parameters under "frozen"."""
    batches = iter([{"audio": jnp.zeros((8, 960))}])
    task = SimpleNamespace(train_iterator=lambda mesh: FrozenInputs(batches, {"codec": {"w": jnp.ones((4, 3))}}))
    abstract = _abstract_batch(task, None)
    assert abstract["audio"].shape == (8, 960) and abstract["frozen"]["codec"]["w"].shape == (4, 3)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))


def test_a_streamed_fit_is_refused_in_one_line():
    """k-means and RVQ fit pass by pass outside one compiled step (`Task.run_step`): nothing to plan."""
    with pytest.raises(ConfigError, match=r"^config.stage='kmeans' is fitted pass by pass .* nothing to plan$"):
        plan_train_step(get_task(stage_config("kmeans", {"upstream.ssl": "/nonexistent"})))
