"""Shared test utilities: tiny configs and subprocess runs of the CLIs."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import ml_collections

from melody_jax.training.config import apply_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_config(stage: str, preset: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    """configs/<stage>.py:<preset>, quiet, logging every step, with `a__b=value` overrides (__ = dot)."""
    module = importlib.import_module(f"configs.{stage}")
    c = module.get_config(preset)
    c.train.tensorboard = False
    c.train.progress_bar = False
    c.train.log_every = 1
    return apply_overrides(c, {k.replace("__", "."): str(v) for k, v in overrides.items()})


def toy_config(**overrides) -> ml_collections.ConfigDict:
    return stage_config("toy_lm", **overrides)


def cli_env(devices: int = 8) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT
    return env


def run_cli(module: str, *args: str, timeout: float = 300, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=cli_env(devices),
                          capture_output=True, text=True, timeout=timeout)
