"""Two processes × 4 CPU devices as one JAX job: training, checkpoints from both, resume, same losses.

Runs `launch.multiprocess` (which runs `launch.train` on 127.0.0.1); the reference is the same config
trained in this process on 8 devices. Both use the global mesh data=4 × fsdp=2.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from melody_jax.training import distributed
from melody_jax.training.errors import ConfigError
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import train
from melody_jax.training.metrics import read_metrics
from tests.helpers import ROOT, cli_env, toy_config

pytestmark = pytest.mark.slow  # two trainer processes and a reference run

MESH = {"mesh.data": 4, "mesh.fsdp": 2}
STEPS, HALF = 12, 6


def launch(workdir, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    args = ["--config=configs/toy_lm.py:tiny", f"--workdir={workdir}", "--config.mesh.data=4",
            "--config.mesh.fsdp=2", f"--config.train.num_steps={STEPS}", f"--config.train.checkpoint_every={HALF}",
            "--config.train.log_every=1", "--config.train.eval_every=1000", "--config.train.tensorboard=False",
            "--config.train.progress_bar=False", *extra]
    cmd = [sys.executable, "-m", "launch.multiprocess", "--num_processes=2", "--devices_per_process=4",
           f"--timeout_s={int(timeout) - 10}", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_save_resume_and_match_one_process(tmp_path):
    workdir = tmp_path / "mp"
    first = launch(workdir, f"--config.train.stop_at_step={HALF}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert "[p0]" in first.stdout and "[p1]" in first.stdout
    assert "process 1 of 2; 4 local / 8 global devices" in first.stdout
    state_dir = workdir / "checkpoints" / str(HALF) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state_dir)), "both processes must write"

    second = launch(workdir)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-2000:]
    assert f"resumed from step {HALF}" in second.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == sorted(["1", str(HALF), str(STEPS)])

    multi = {m["step"]: m["loss"] for m in read_metrics(workdir)}
    assert sorted(multi) == list(range(1, STEPS + 1)), "one trajectory, logged once (by process 0)"
    train(get_task(toy_config({"train.num_steps": STEPS, "train.checkpoint_every": HALF, **MESH})), str(tmp_path / "one"))
    single = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "one")}
    np.testing.assert_allclose([multi[s] for s in range(1, STEPS + 1)], [single[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5, atol=1e-5)
    assert single[STEPS] < single[1] - 0.5


def launcher(*args: str, timeout_s: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.multiprocess", "--num_processes=3", "--devices_per_process=1",
           "--module=tests.multiprocess_worker", f"--timeout_s={timeout_s}", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=60)


def test_a_failing_process_stops_the_others():
    out = launcher("--fail", timeout_s=50)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "[p1] worker 1 of 3 at 127.0.0.1:" in out.stdout
    assert "a process exited with 3; stopped all" in out.stderr


def test_the_job_is_stopped_at_its_deadline():
    out = launcher(timeout_s=5)
    assert out.returncode == 124, out.stdout + out.stderr
    assert {f"[p{i}] worker {i} of 3" for i in range(3)} <= {line[:len("[p0] worker 0 of 3")]
                                                           for line in out.stdout.splitlines()}
    assert "timed out; stopped all" in out.stderr


def test_explicit_start_up_flags_are_checked():
    with pytest.raises(ConfigError, match="must be given together"):
        distributed.initialize("auto", coordinator="127.0.0.1:1234")
    with pytest.raises(ConfigError, match=r"--process_id=2 must lie in \[0, --num_processes=2\)"):
        distributed.initialize("auto", coordinator="127.0.0.1:1234", num_processes=2, process_id=2)
    assert distributed.initialize("off", coordinator="127.0.0.1:1234", num_processes=2, process_id=0) is False


def test_cluster_detection_reads_the_scheduler_environment(monkeypatch):
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES",
                "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed._cluster_detected()
    assert distributed.initialize("auto") is False  # a plain single-process run stays single-process
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert not distributed._cluster_detected()
    monkeypatch.setenv("SLURM_NTASKS", "16")
    assert distributed._cluster_detected()
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1,t1v-2,t1v-3")
    assert distributed._cluster_detected()


def fake_tools(tmp_path, scripts: dict[str, str]) -> dict[str, str]:
    """Executables that stand in for gcloud/srun/scontrol/python; returns an env with them first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return {**cli_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_tpu_pod_script_runs_the_same_command_on_every_worker(tmp_path):
    env = fake_tools(tmp_path, {"gcloud": 'printf "%s\\n" "$@"\n'})
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "my-pod", "us-central2-b", "--config=configs/toy_lm.py:tiny",
                          "--workdir=gs://b/run dir"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:6] == ["compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone=us-central2-b"]
    assert "--worker=all" in lines
    command = out.stdout.split("--command=", 1)[1]
    assert "-m launch.train --distributed=on --config=configs/toy_lm.py:tiny --workdir=gs://b/run\\ dir" in command


def test_slurm_script_passes_the_coordinator_to_every_task(tmp_path):
    repo = tmp_path / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    python = repo / ".venv" / "bin" / "python"
    python.write_text('#!/usr/bin/env bash\necho "task: $*"\n')
    python.chmod(0o755)
    env = fake_tools(tmp_path, {
        "scontrol": 'printf "gpu-node-7\\ngpu-node-8\\n"\n',
        "srun": 'while [[ $1 == --* ]]; do shift; done\nfor i in 0 1; do SLURM_PROCID=$i "$@"; done\n'})
    env.update(SLURM_JOB_ID="123457", SLURM_JOB_NODELIST="gpu-node-[7-8]", SLURM_NTASKS="2",
               SLURM_JOB_NUM_NODES="2", REPO_DIR=str(repo))
    out = subprocess.run(["bash", "launch/slurm.sbatch", "--config=configs/dpd.py:paper", "--workdir=/shared/r"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    port = 123457 % 4096 + 61440
    tasks = [line for line in out.stdout.splitlines() if line.startswith("task: ")]
    assert tasks == [f"task: -m launch.train --coordinator=gpu-node-7:{port} --num_processes=2 --process_id={i} "
                     "--config=configs/dpd.py:paper --workdir=/shared/r" for i in (0, 1)]
