"""Multi-host start-up: one program per host joins the others before JAX touches a device.

`jax.distributed.initialize` auto-detects SLURM, Cloud TPU (GCE and GKE), Open MPI and Kubernetes
through JAX's own cluster detection; anything else passes an explicit coordinator address. Must run
before the first computation (or `jax.devices()`), which is why the launchers call it first thing.
"""
from __future__ import annotations

import os
import re

import jax
from absl import logging

from melody_jax.training.errors import ConfigError

MODES = ("auto", "on", "off")
# Single-process runs under these schedulers need no coordinator; more than one task does.
_MULTI_TASK_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _cluster_detected() -> bool:
    """True where JAX's cluster detection would find a multi-process job (no network probes)."""
    for var in _MULTI_TASK_ENV:
        if int(os.environ.get(var, "1") or 1) > 1:
            return True
    # Cloud TPU: a multi-host slice lists its workers; a single host needs no coordinator.
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("TPU_PROCESS_ADDRESSES") or ""
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    return os.environ.get("JAX_COORDINATOR_ADDRESS") is not None


def initialize(mode: str = "auto", coordinator: str = "", num_processes: int = 0, process_id: int = -1,
               timeout_s: int = 300) -> bool:
    """Joins the job; returns whether JAX now runs distributed.

    mode "off": never; "on": always (explicit flags, else JAX's auto-detection must succeed);
    "auto": when a coordinator is given or a multi-process cluster is detected.
    """
    if mode not in MODES:
        raise ConfigError(f"--distributed={mode!r} must be one of {MODES}")
    explicit = bool(coordinator) or num_processes > 0 or process_id >= 0
    if explicit and not (coordinator and num_processes > 0 and process_id >= 0):
        raise ConfigError("--coordinator, --num_processes and --process_id must be given together "
                          f"(got {coordinator!r}, {num_processes}, {process_id})")
    if explicit and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
    if mode == "off" or (mode == "auto" and not explicit and not _cluster_detected()):
        return False
    if explicit:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, initialization_timeout=timeout_s)
    else:
        jax.distributed.initialize(initialization_timeout=timeout_s)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    if jax.process_index() != 0:  # one log for the job: the others speak only of trouble
        logging.set_verbosity(logging.WARNING)
    return True


def process_env(devices: int) -> dict[str, str]:
    """This environment for a child process on this host: CPU only, `devices` fake devices (replacing
    any device count in XLA_FLAGS, keeping the other flags), the repository on PYTHONPATH."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env
