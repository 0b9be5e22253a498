"""Issue 27, cases 1, 2 and 16: one trainer per workdir (a lock held for the run's life, gone with its
holder after a kill -9), a metrics log that stays one trajectory with each step once, a
`final_metrics.json` that a rerun never empties, and Ctrl-C saving like SIGTERM.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from melody_jax.training import checkpoint as checkpoint_lib
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.training.errors import WorkdirError
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import train
from melody_jax.training.metrics import MetricsWriter, read_metrics
from melody_jax.training.workdir_lock import WorkdirLock
from tests.helpers import ROOT, cli_env, run_cli, toy_config

TOY = ("--config=configs/toy_lm.py:tiny", "--config.train.log_every=1", "--config.train.tensorboard=False",
       "--config.train.progress_bar=False")


def test_case1_16_second_trainer_is_refused_naming_the_holder_and_ctrl_c_saves(tmp_path):
    """A runs; B on the same workdir exits 2 naming A's pid and touches nothing; Ctrl-C stops A with a
    checkpoint at the step it reached, and its log holds steps 1..reached once each."""
    workdir = tmp_path / "run"
    long_run = (*TOY, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000")
    a = subprocess.Popen([sys.executable, "-m", "launch.train", f"--workdir={workdir}", *long_run], cwd=ROOT,
                         env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and len(read_metrics(workdir)) < 5:
            assert a.poll() is None, a.stderr.read().decode()[-2000:]
            time.sleep(0.1)
        assert len(read_metrics(workdir)) >= 5, "the first trainer did not start in time"
        b = run_cli("launch.train", f"--workdir={workdir}", *long_run, timeout=180)
        assert a.poll() is None, "the first trainer ended before the second was refused: the test proves nothing"
        errors = [line for line in b.stderr.splitlines() if line.startswith("error:")]
        assert b.returncode == 2 and "Traceback" not in b.stderr and len(errors) == 1, b.stderr[-2000:]
        assert errors[0].startswith(f"error: workdir {workdir} is in use by pid {a.pid} on host "), errors[0]
        a.send_signal(signal.SIGINT)
        _, err = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()
    err = err.decode()
    assert a.returncode == 0 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    steps = [m["step"] for m in read_metrics(workdir)]
    reached = steps[-1]
    assert steps == list(range(1, reached + 1)), "the first trainer's log has missing, repeated or unordered steps"
    ckpt = Checkpointer(str(workdir), keep=3, every=1)
    assert ckpt.latest_step() == reached, "Ctrl-C did not save at the step reached"
    ckpt.close()


def test_case1_lock_of_a_killed_trainer_is_not_stale(tmp_path):
    """kill -9 of the holder frees the workdir at once: the kernel drops an flock with its process."""
    code = ("import sys, time; from melody_jax.training.workdir_lock import WorkdirLock; "
            f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(WorkdirError, match=rf"^workdir {tmp_path} is in use by pid {holder.pid} on host .* "
                                               r"\(started .* UTC\); wait for that run to end or use another"):
            WorkdirLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = WorkdirLock(str(tmp_path)).acquire()  # the dead holder's lock file is still there, its lock is not
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    WorkdirLock(str(tmp_path)).acquire().release()  # released: free again


def test_case2_rerun_keeps_final_metrics_and_every_line_precedes_its_checkpoint(tmp_path, monkeypatch):
    """A checkpoint is saved only after its step's line is in the log (so no kill can lose that line);
    rerunning a finished run returns and writes the same final metrics, never `{"status", "step"}` alone."""
    config = toy_config({"train.num_steps": 6, "train.checkpoint_every": 2, "train.eval_every": 3})
    saved_with_line = []
    open_before = set(checkpoint_lib._OPEN)  # managers other tests in this process left are theirs
    real_save = Checkpointer.save

    def save(self, step, *args, **kwargs):
        if self.should_save(step) or kwargs.get("force"):
            saved_with_line.append((step, step in [m["step"] for m in read_metrics(tmp_path)]))
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(Checkpointer, "save", save)
    summary = train(get_task(config), str(tmp_path))
    assert {2, 4, 6} <= {step for step, _ in saved_with_line}, saved_with_line
    assert all(logged for _, logged in saved_with_line), saved_with_line
    first = (tmp_path / "final_metrics.json").read_text()
    assert json.loads(first) == summary and {"loss", "eval_loss", "bad_steps", "grad_norm"} <= set(summary)
    assert summary["status"] == "done" and summary["step"] == 6
    again = train(get_task(config), str(tmp_path))
    assert again == summary and (tmp_path / "final_metrics.json").read_text() == first
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert not checkpoint_lib._OPEN - open_before, "a checkpoint manager was left open"


def test_case2_resume_repairs_a_log_with_duplicates_torn_lines_and_disorder(tmp_path):
    lines = [{"step": 1, "loss": 1.0}, {"step": 3, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 9.0},
             {"step": 4, "loss": 4.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines) + '{"step": 5, "lo')
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False, resume_step=3)
    writer.write(4, {"loss": float("nan")})
    writer.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0},
                                      {"step": 4, "loss": "nan"}]
