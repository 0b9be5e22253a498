"""kill -9 at seeded random moments, some inside an async checkpoint write, then the same command again.

A run that survives SIGKILL must resume from the newest *complete* checkpoint (Orbax's
`<step>.orbax-checkpoint-tmp` directories are never taken for one), keep one metrics trajectory,
and end with exactly the parameters of a run that was never interrupted (bit for bit on CPU).
"""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from melody_jax.tasks.toy_lm import ToyLMTask
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.training.loop import sharded_abstract_state
from melody_jax.training.metrics import read_metrics
from melody_jax.training.sharding import activate, config_rules, make_mesh
from tests.helpers import ROOT, cli_env, toy_config

pytestmark = pytest.mark.slow  # trainer processes killed and restarted

NUM_STEPS = 24
FLAGS = ("--config=configs/toy_lm.py:tiny", f"--config.train.num_steps={NUM_STEPS}",
         "--config.train.checkpoint_every=1", "--config.train.keep_checkpoints=3", "--config.train.log_every=1",
         "--config.train.tensorboard=False", "--config.train.progress_bar=False")
TMP = ".orbax-checkpoint-tmp"
PHASE_TIMEOUT_S = 240.0


def start(workdir: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "launch.train", f"--workdir={workdir}", *FLAGS], cwd=ROOT,
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(timeout=PHASE_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    return text


def complete_steps(workdir: Path) -> list[int]:
    """Finalised checkpoints: Orbax renames `<step>.orbax-checkpoint-tmp` to `<step>` when a save is done."""
    root = workdir / "checkpoints"
    return sorted(int(n) for n in os.listdir(root) if n.isdigit()) if root.exists() else []


def tmp_dirs(workdir: Path) -> list[str]:
    root = workdir / "checkpoints"
    try:
        return [n for n in os.listdir(root) if TMP in n]
    except FileNotFoundError:
        return []


def last_logged(workdir: Path) -> int:
    try:
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(m.group(1)) for m in (re.match(r'\{"step": (\d+)', line) for line in lines) if m]
    return max(steps, default=0)


def kill_when(proc: subprocess.Popen, ready, what: str, delay: float = 0.0) -> None:
    """SIGKILL `delay` seconds after `ready()` holds (polled every 5 ms), within a deadline."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while not ready():
        assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    time.sleep(delay)
    assert proc.poll() is None, f"the run ended (rc={proc.returncode}) before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def final_state(workdir: Path):
    config = toy_config()
    mesh = make_mesh(config.mesh)
    rules = config_rules(config)
    ckpt = Checkpointer(str(workdir), keep=3, every=1)
    try:
        with activate(mesh, rules):
            abstract, _ = sharded_abstract_state(ToyLMTask(config), mesh, rules, jax.random.key(0))
            state, data = ckpt.restore(NUM_STEPS, abstract)
        return jax.device_get(state), data
    finally:
        ckpt.close()


def test_kill9_at_random_moments_resumes_from_newest_complete_checkpoint(tmp_path):
    rng = random.Random(20240612)
    reference = tmp_path / "reference"
    finish(start(reference, tmp_path / "reference.log"), tmp_path / "reference.log")

    workdir = tmp_path / "killed"
    # Alternate: a kill while a checkpoint is being written, a kill a random time after a random step.
    plans = ["mid_write", "random", "mid_write", "random"]
    mid_write_hits, resumed_from, expected_from = 0, [], []
    for i, plan in enumerate(plans):
        log = tmp_path / f"run{i}.log"
        before = last_logged(workdir)
        proc = start(workdir, log)
        progress = before + rng.randint(1, 3)  # let every attempt move on before it dies
        if plan == "mid_write":
            kill_when(proc, lambda: last_logged(workdir) >= progress and tmp_dirs(workdir), "a checkpoint write")
        else:
            kill_when(proc, lambda: last_logged(workdir) >= progress, f"step {progress}", rng.uniform(0.0, 0.5))
        text = log.read_text(errors="replace")
        resumed = re.findall(r"resumed from step (\d+)", text)
        if i:
            resumed_from.append(int(resumed[0]) if resumed else 0)
        leftovers = tmp_dirs(workdir)
        mid_write_hits += bool(leftovers)
        complete = complete_steps(workdir)  # none when the kill hit the first save: the restart starts afresh
        expected_from.append(max(complete, default=0))
        for name in leftovers:  # an unfinished save is always newer than every complete one
            assert int(name.split(".")[0]) > max(complete, default=0), (name, complete)

    log = tmp_path / "final.log"
    text = finish(start(workdir, log), log)
    resumed_from.append(int(re.findall(r"resumed from step (\d+)", text)[0]))
    print(f"kills: {plans}; resumed from {resumed_from}; mid-write kills that left a tmp dir: {mid_write_hits}")
    assert resumed_from == expected_from, "a restart did not resume from the newest complete checkpoint"
    assert mid_write_hits >= 2, f"only {mid_write_hits} kills landed inside a checkpoint write"
    assert not tmp_dirs(workdir), "unfinished checkpoint directories were left behind after completion"

    want, got = read_metrics(reference), read_metrics(workdir)
    assert [m["step"] for m in got] == list(range(1, NUM_STEPS + 1)), "the log is not one trajectory"
    assert [m["loss"] for m in got] == [m["loss"] for m in want]  # every loss, bit for bit
    (ref_state, ref_data), (state, data) = final_state(reference), final_state(workdir)
    assert ref_data == data == {"index": NUM_STEPS}
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), ref_state, state)
    assert all(jax.tree.leaves(same)), "parameters or optimizer state differ from the uninterrupted run"
