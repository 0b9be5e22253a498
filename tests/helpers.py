"""Shared test utilities: tiny configs and subprocess runs of the CLIs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import ml_collections

from configs import common
from melody_jax.tasks.toy_lm import ToyLMTask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED_MUSIC = os.path.join(ROOT, "assets", "audio", "music21_test_audio.flac")  # see its NOTICE.md
QUIET = {"train.tensorboard": False, "train.progress_bar": False, "train.log_every": 1}  # every test config's


def stage_config(stage: str, overrides: Mapping[str, Any] | None = None, *, preset: str = "tiny"
                 ) -> ml_collections.ConfigDict:
    """configs/<stage>.py:<preset>, quiet, logging every step, with `{"a.b": value}` overrides."""
    return common.stage_config(stage, preset, {**QUIET, **(overrides or {})})


def toy_config(overrides=None) -> ml_collections.ConfigDict:
    return stage_config("toy_lm", overrides)


def cli_env(devices: int = 8) -> dict[str, str]:
    """This process's environment (the compile flags conftest sets included) with `devices` CPU devices."""
    from melody_jax.training.distributed import process_env

    env = process_env(devices)
    # numba's cached gufuncs (librosa's) break when processes that compiled them in different orders share
    # the cache files (numba#10128: later calls segfault): each CLI gets a directory of its own, started as a
    # copy of this process's cache (written by it alone, so its pairs of files match). librosa compiles its
    # gufuncs when its submodules load: ~20 CPU-s in every CLI that starts from an empty cache.
    own = os.environ.get("NUMBA_CACHE_DIR")  # tests/conftest.py sets one per worker
    parent = own or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    env["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba-cli-", dir=parent)
    if own:
        shutil.copytree(own, env["NUMBA_CACHE_DIR"], ignore=shutil.ignore_patterns("numba-cli-*"), dirs_exist_ok=True)
    return env


def run_cli(module: str, *args: str, timeout: float = 300, devices: int = 8) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=cli_env(devices),
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc) -> str:
    """The CLI's one `error:` line, after asserting exit 2 and no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


def stage_layout(config: ml_collections.ConfigDict):
    """(task, mesh, rules, abstract train state with shardings, sharding tree) for the config's mesh."""
    import jax

    from melody_jax.tasks.registry import get_task
    from melody_jax.training.loop import sharded_abstract_state
    from melody_jax.training.sharding import activate, make_mesh, rules_from_config

    task = get_task(config)
    mesh, rules = make_mesh(config.mesh), rules_from_config(config.sharding_rules)
    with activate(mesh, rules):
        abstract, shardings = sharded_abstract_state(task, mesh, rules, jax.random.key(0))
    return task, mesh, rules, abstract, shardings


def train_and_restore(config: ml_collections.ConfigDict, workdir: str):
    """Trains the config to its last step in `workdir`; (summary, metric records, task, final params on host)."""
    import jax

    from melody_jax.tasks.registry import get_task
    from melody_jax.training.checkpoint import Checkpointer
    from melody_jax.training.loop import train
    from melody_jax.training.metrics import read_metrics
    from melody_jax.training.sharding import activate

    summary = train(get_task(config), workdir)
    task, mesh, rules, abstract, _ = stage_layout(config)
    ckpt = Checkpointer(workdir, keep=3, every=1)
    with activate(mesh, rules):
        state, _ = ckpt.restore(config.train.num_steps, abstract)
    ckpt.close()
    return summary, read_metrics(workdir), task, jax.device_get(state.params)


def one_device_mesh():
    """A (data, fsdp, tensor) mesh of one device: the fastest for tiny fits in a test."""
    import jax

    from melody_jax.training.sharding import MESH_AXES

    return jax.make_mesh((1, 1, 1), MESH_AXES, devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,) * 3)


def fit(task, mesh) -> Any:
    """The task's params after `config.train.num_steps` steps on its training batches, without the loop's
    checkpoints and logs (call inside `activate(mesh, ...)`)."""
    import jax
    from flax import linen as nn

    state = jax.jit(lambda r: nn.meta.unbox(task.init_state(r)))(jax.random.key(0))
    step = jax.jit(task.train_step, donate_argnums=0)
    batches = task.train_iterator(mesh)
    for i in range(task.config.train.num_steps):
        state, _ = step(state, next(batches), jax.random.key(i))
    return state.params


class PoisonedToyLM(ToyLMTask):
    """The toy LM whose loss adds a batch's `poison` (NaN, Inf or 0): tests inject non-finite steps through the data."""

    def loss(self, params, batch, rng, train=True):
        loss, metrics = super().loss(params, batch, rng, train)
        return (loss + batch["poison"].mean() if "poison" in batch else loss), metrics
