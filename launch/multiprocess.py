"""N local processes on 127.0.0.1 as one JAX job: multi-host behaviour on one machine (CPU devices).

  python -m launch.multiprocess --num_processes=2 --devices_per_process=4 -- \\
      --config=configs/toy_lm.py:tiny --workdir=DIR --config.mesh.data=4 --config.mesh.fsdp=2

Everything after `--` goes to `launch.train` (or `--module`), with `--coordinator`, `--num_processes`
and `--process_id` added. Output lines are prefixed `[pI]`. The first process to fail (or the
`--timeout_s` deadline) stops the rest, so a crashed peer never leaves the others waiting forever.
"""
from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

from absl import flags

from launch.common import run_app
from melody_jax.training.distributed import process_env

_NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 4, "Fake CPU devices per process.")
_MODULE = flags.DEFINE_string("module", "launch.train", "Module each process runs (`python -m`).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 3600, "Stop all processes after this many seconds (exit 124).")
_GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str, lock: threading.Lock) -> None:
    for line in proc.stdout:
        with lock:
            sys.stdout.write(f"{prefix}{line}")
            sys.stdout.flush()


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + _GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(module: str, args: list[str], num_processes: int, devices: int, timeout_s: float) -> int:
    """Starts the job and waits; returns 0, the first non-zero exit code, or 124 on timeout."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = process_env(devices)
    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", module, *args, f"--coordinator={coordinator}",
               f"--num_processes={num_processes}", f"--process_id={i}"]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(proc, f"[p{i}] ", lock), daemon=True))
        pumps[-1].start()
    deadline = time.time() + timeout_s
    code = 0
    try:
        while [p.poll() for p in procs].count(None):  # polls every process (any() would stop early)
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:
                code = failed[0]
                break
            if time.time() > deadline:
                code = 124
                break
            time.sleep(0.1)
        else:
            code = next((p.returncode for p in procs if p.returncode), 0)
    finally:
        _stop(procs)
        for t in pumps:
            t.join(timeout=_GRACE_S)
    if code:
        print(f"multiprocess: {'timed out' if code == 124 else f'a process exited with {code}'}; "
              "stopped all", file=sys.stderr)
    return code


def main(argv: list[str]) -> None:
    sys.exit(run(_MODULE.value, argv[1:], _NUM.value, _DEVICES.value, _TIMEOUT.value))


if __name__ == "__main__":
    run_app(main)
