"""Loading a trained stage builds its network from the stored config; no training Task is constructed."""
import jax
import numpy as np
import pytest

from melody_jax.frozen.loader import load_stage
from melody_jax.frozen.vae import FrozenVAE
from benchmarks.untrained import init_workdir
from melody_jax.tasks.registry import get_task
from melody_jax.training.errors import WorkdirError
from melody_jax.training.sharding import DEFAULT_RULES, activate, make_mesh
from melody_jax.training.task import Task
from tests.helpers import stage_config, toy_config


def test_loading_stages_builds_no_task(tmp_path, monkeypatch):
    toy_config_ = toy_config()
    init_workdir(toy_config_, str(tmp_path / "toy"))  # written by a Task, before the refusal below
    init_workdir(stage_config("vae_gan", {"data.path": "x"}), str(tmp_path / "vae"))
    expected = get_task(toy_config_).init_params(jax.random.key(toy_config_.seed))

    def refuse(self, config):
        raise AssertionError(f"a {config.stage} Task was built while loading a frozen stage")

    monkeypatch.setattr(Task, "__init__", refuse)
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    with activate(mesh, DEFAULT_RULES):
        toy = load_stage(str(tmp_path / "toy"), "toy_lm", mesh, DEFAULT_RULES, field="toy")
        vae = FrozenVAE.load(str(tmp_path / "vae"), mesh, DEFAULT_RULES)
        with pytest.raises(WorkdirError, match="holds the 'toy_lm' stage, not 'vae_gan'"):
            FrozenVAE.load(str(tmp_path / "toy"), mesh, DEFAULT_RULES)
    assert toy.step == 0 and toy.config.stage == "toy_lm"
    for a, b in zip(jax.tree.leaves(jax.device_get(toy.params)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(a, np.asarray(getattr(b, "value", b)))
    assert vae.hop == vae.model.hop and set(vae.params) == {"encoder", "decoder"}
