"""Fine-tuning from a trained stage: init_from (by name and shape), LoRA adapters, merged export."""
import json
import os

import jax
import numpy as np
import pytest

from melody_jax.pipelines.bundle import export_stage
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.training.errors import BundleError, WorkdirError
from melody_jax.frozen.loader import load_stage
from melody_jax.training.lora import LoRATask
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import init_sharded_state, train
from melody_jax.training.sharding import activate
from melody_jax.training.workdir_lock import LOCK_NAME
from tests.helpers import run_cli, stage_config, stage_layout, toy_config

pytestmark = pytest.mark.slow  # trainings of a stage and its adapters

QUIET = {"train.eval_every": 1000, "train.checkpoint_every": 1000}
# new data: strides up to 6 where the base saw up to 4, from another seed
LORA = {"seed": 1, "data.num_strides": 6, "model.lora.rank": 2, "train.num_steps": 30, "optim.lr": 1e-2, **QUIET}


def final_params(cfg, workdir):
    _, mesh, rules, abstract, _ = stage_layout(cfg)
    ckpt = Checkpointer(str(workdir), keep=3, every=1)
    with activate(mesh, rules):
        state, _ = ckpt.restore(cfg.train.num_steps, abstract)
    ckpt.close()
    return jax.device_get(state.params)


def test_lora_trains_only_adapters_and_exports_merged_weights(tmp_path, capsys):
    base_dir, lora_dir = tmp_path / "base", tmp_path / "lora"
    base_cfg = toy_config({"train.num_steps": 30, **QUIET})
    train(get_task(base_cfg), str(base_dir))
    base = final_params(base_cfg, base_dir)

    cfg = toy_config({"train.init_from": str(base_dir), **LORA})
    capsys.readouterr()
    train(get_task(cfg), str(lora_dir))
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("LoRA:"))
    share = float(line.split("(")[1].split("%")[0])
    assert share < 5.0, line  # measured: 1024 of 91456 (1.12 %)
    tuned = final_params(cfg, lora_dir)
    for name in base:  # the base, bit for bit
        for a, b in zip(jax.tree.leaves(tuned[name]), jax.tree.leaves(base[name])):
            np.testing.assert_array_equal(a, b)
    assert set(tuned) == set(base) | {"lora"}
    assert all(np.abs(b).max() > 1e-4 for b in jax.tree.leaves(tuned["lora"]))  # every adapter moved

    # export: refused without --merge_lora; merged, a plain stage whose outputs equal the adapter model's
    task, mesh, rules, _, _ = stage_layout(cfg)
    assert isinstance(task, LoRATask)
    with activate(mesh, rules):
        with pytest.raises(BundleError, match="pass --merge_lora"):
            export_stage(str(lora_dir), "toy_lm", str(tmp_path / "refused"), mesh, rules)
        export_stage(str(lora_dir), "toy_lm", str(tmp_path / "merged"), mesh, rules, merge_lora=True)
        loaded = load_stage(str(tmp_path / "merged"), "toy_lm", mesh, rules, field="bundle")
        plain, merged = task.inner, loaded.params
        assert loaded.model == plain.model and "lora" not in merged
        held_out = task.batches(mesh, "test")  # the new data, batches no run has seen
        batches = [next(held_out) for _ in range(8)]
        rng = jax.random.key(0)
        adapted = [float(jax.jit(task.loss)(tuned, b, rng)[0]) for b in batches]
        merged_out = [float(jax.jit(plain.loss)(merged, b, rng)[0]) for b in batches]
        before = [float(jax.jit(plain.loss)(base, b, rng)[0]) for b in batches]
    np.testing.assert_allclose(merged_out, adapted, rtol=1e-5, atol=1e-5)
    # measured: 2.854 → 2.674 nats (30 steps, rank 2 on query and value)
    assert np.mean(adapted) < np.mean(before) - 0.1, (np.mean(before), np.mean(adapted))


def test_init_from_refuses_another_stage_or_shape_in_one_line(tmp_path):
    base_dir = tmp_path / "base"
    train(get_task(toy_config({"train.num_steps": 2, **QUIET})), str(base_dir))
    work = tmp_path / "work"
    out = run_cli("launch.train", "--config=configs/toy_lm.py:tiny", f"--workdir={work}",
                  f"--config.train.init_from={base_dir}", "--config.model.mlp_dim=96")
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-1500:]
    assert lines[0] == (f"error: config.train.init_from={str(base_dir)!r} does not fit this model: parameter "
                        "layer_0/mlp/down/kernel has shape [128, 64] there and [96, 64] here")
    written = [f for _, _, files in os.walk(work) for f in files if f != LOCK_NAME]  # the run's lock only
    assert not written, "nothing may be written"

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"stage": "dpd"}))
    with pytest.raises(WorkdirError, match=r"holds the 'dpd' stage, not 'toy_lm'"):
        train(get_task(toy_config({"train.init_from": str(other), **QUIET})), str(tmp_path / "work2"))
    assert not [f for _, _, files in os.walk(tmp_path / "work2") for f in files if f != LOCK_NAME]


def test_lora_on_the_dpd_changes_only_adapters(tmp_path):
    """The DPD (self/cross-attention query and value kernels of its RoFormer layers), 6 steps from init."""
    cfg = stage_config("dpd", {"model.lora.rank": 2, "train.num_steps": 6, "optim.lr": 1e-2, **QUIET})
    train(get_task(cfg), str(tmp_path))
    task, mesh, rules, _, shardings = stage_layout(cfg)
    with activate(mesh, rules):
        init = jax.device_get(init_sharded_state(task, shardings, jax.random.split(jax.random.key(cfg.seed), 3)[0]))
    tuned = final_params(cfg, tmp_path)
    assert set(tuned) == set(init.params)
    for name in set(tuned) - {"lora"}:
        for a, b in zip(jax.tree.leaves(tuned[name]), jax.tree.leaves(init.params[name])):
            np.testing.assert_array_equal(a, b)
    lora_b = [x for p, x in jax.tree_util.tree_flatten_with_path(tuned["lora"])[0] if str(p[-1]) == "['b']"]
    assert len(lora_b) == 4 * cfg.model.num_blocks * cfg.model.roformer_layers and all(np.abs(b).max() > 0 for b in lora_b)
    share = sum(x.size for x in jax.tree.leaves(tuned["lora"])) / sum(x.size for x in jax.tree.leaves(tuned))
    assert share < 0.05, share
