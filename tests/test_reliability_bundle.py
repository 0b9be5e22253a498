"""Issue 27, case 10: `launch.bundle` failing part-way leaves no stage folders behind, and the same
command then succeeds (it used to die with StepAlreadyExistsError)."""
from __future__ import annotations

import os
import shutil

import jax
import pytest

from benchmarks.untrained import init_workdir
from melody_jax.pipelines.bundle import MANIFEST, MUSICGEN_STAGES, assemble
from melody_jax.training.errors import BundleError
from melody_jax.training.sharding import DEFAULT_RULES, make_mesh
from tests.helpers import stage_config

pytestmark = pytest.mark.slow  # bundles assembled through the CLI


def test_case10_bundle_failing_part_way_cleans_up_and_reruns(tmp_path):
    configs = {"codec": stage_config("codec", {"data.path": "x"}), "musicgen": stage_config("musicgen")}
    for stage, config in configs.items():  # what tests/bundle_fixture.py bundles, left unassembled
        init_workdir(config, str(tmp_path / stage))
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    broken = shutil.copytree(tmp_path / "musicgen", tmp_path / "broken")
    shutil.rmtree(os.path.join(broken, "checkpoints"))
    out = tmp_path / "out"
    with pytest.raises(BundleError):  # codec exported, then the LM's workdir fails
        assemble(str(out), {"codec": str(tmp_path / "codec"), "musicgen": broken}, mesh, DEFAULT_RULES,
                 MUSICGEN_STAGES)
    assert not out.exists(), "a failed bundle left files behind"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(BundleError):
        assemble(str(out), {"codec": str(tmp_path / "codec"), "musicgen": broken}, mesh, DEFAULT_RULES,
                 MUSICGEN_STAGES)
    assert sorted(os.listdir(out)) == ["notes.txt"]  # a folder the user made is kept, with what it held
    shutil.copytree(tmp_path / "codec", out / "codec")  # an older version's leftover: step 0 already there
    manifest = assemble(str(out), {"codec": str(tmp_path / "codec"), "musicgen": str(tmp_path / "musicgen")}, mesh,
                        DEFAULT_RULES, MUSICGEN_STAGES)
    assert manifest["stages"] == list(MUSICGEN_STAGES) and (out / MANIFEST).exists()
    assert sorted(os.listdir(out)) == sorted(["codec", "musicgen", "notes.txt", MANIFEST])
