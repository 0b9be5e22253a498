"""launch.sweep: grid expansion, dry-run commands, sequential runs, skipping finished runs."""
import json

import pytest

from launch.sweep import expand, parse_grid, run_name, sweep, table
from melody_jax.training.errors import ConfigError
from tests.helpers import run_cli, toy_config


def test_grid_expands_to_the_product():
    runs = expand(parse_grid(["optim.lr=1e-4,3e-4", "model.num_layers=2,4,6"]))
    assert len(runs) == 6 and runs[0] == {"optim.lr": "1e-4", "model.num_layers": "2"}
    assert run_name(runs[-1]) == "optim.lr=3e-4,model.num_layers=6"
    with pytest.raises(ConfigError, match="must look like"):
        parse_grid(["optim.lr"])


def test_dry_run_prints_one_command_per_run(tmp_path):
    out = run_cli("launch.sweep", "--config=configs/toy_lm.py:tiny", "--config.train.num_steps=7",
                  "--grid=optim.lr=1e-4,3e-4", "--grid=model.num_layers=2,4", f"--workdir_root={tmp_path}",
                  "--dry_run")
    commands = [line for line in out.stdout.splitlines() if line.startswith("python -m launch.train")]
    assert out.returncode == 0 and len(commands) == 4, out.stderr[-1000:]
    assert all("--config.train.num_steps=7" in c for c in commands)
    assert f"--workdir={tmp_path}/optim.lr=3e-4,model.num_layers=4" in commands[-1]
    assert not list(tmp_path.iterdir()), "a dry run must not create run directories"


def test_unknown_grid_key_is_a_one_line_error(tmp_path):
    out = run_cli("launch.sweep", "--config=configs/toy_lm.py:tiny", "--grid=optim.nope=1,2",
                  f"--workdir_root={tmp_path}", "--dry_run")
    assert out.returncode == 2 and "error: config.optim.nope is missing" in out.stderr


def test_runs_then_skips_finished_runs(tmp_path):
    base = toy_config({"train.num_steps": 6})
    grid = ["optim.lr=1e-3,3e-3"]
    rows = sweep(base, grid, str(tmp_path), False, {}, "configs/toy_lm.py:tiny")
    assert [s["status"] for _, s in rows] == ["done", "done"] and all(s["step"] == 6 for _, s in rows)
    assert rows[0][1]["loss"] != rows[1][1]["loss"], "different learning rates must give different runs"
    again = sweep(base, grid, str(tmp_path), False, {}, "configs/toy_lm.py:tiny")
    assert [s["status"] for _, s in again] == ["skipped (done)"] * 2
    assert [s["loss"] for _, s in again] == [s["loss"] for _, s in rows]
    saved = json.load(open(tmp_path / "sweep_results.json"))
    assert [r["run"] for r in saved] == ["optim.lr=1e-3", "optim.lr=3e-3"]
    assert "| optim.lr=3e-3 | skipped (done) | 6 |" in table(again)
