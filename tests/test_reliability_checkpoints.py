"""Issue 27, cases 6, 7, 8, 11 and 13: restored state is checked (a damaged checkpoint that decodes as
NaN is refused, nothing is saved over the good ones), a full disk and a lost manifest are one line with
the older checkpoints intact, a resume with another seed is one line, damaged or missing data is one
line with no background traceback, and skipped bad steps are warned about, counted and written as
strict JSON.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from data_pipeline.builder import PrepareSettings, find_prepared, prepare
from data_pipeline.input import DataError, default_data_config, make_train_iterator
from melody_jax.training import checkpoint as checkpoint_lib
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.training.errors import WorkdirError
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import train
from melody_jax.training.metrics import read_metrics
from melody_jax.training.sharding import make_mesh
from tests.helpers import run_cli, toy_config
from tests.test_reliability_training import FaultyTask, restore

pytestmark = pytest.mark.slow  # a trained workdir damaged and resumed

CONFIG = {"train.num_steps": 4, "train.checkpoint_every": 1, "train.keep_checkpoints": 10}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train(get_task(toy_config(CONFIG)), workdir)
    return workdir


def copy(trained: str, tmp_path) -> str:
    return shutil.copytree(trained, str(tmp_path / "run"))


def test_case6_checkpoint_that_restores_as_nan_is_refused_and_nothing_is_saved_over(trained, tmp_path):
    """A bit flip that still decodes (here: NaN written into step 4's parameters) must not be trained on."""
    workdir = copy(trained, tmp_path)
    config = toy_config({**CONFIG, "train.num_steps": 8})
    state = restore(config, workdir, 4)
    ckpt = Checkpointer(workdir, keep=10, every=1)
    meta = ckpt.read_meta(4)
    ckpt.close()
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
    ckpt = Checkpointer(workdir, keep=10, every=1)
    def poison(x: np.ndarray) -> np.ndarray:
        x = np.array(x)
        x.flat[0] = np.nan
        return x

    poisoned = state.replace(params=jax.tree.map(poison, state.params))
    ckpt.save(4, poisoned, {"index": 4}, meta, force=True)
    ckpt.wait()
    ckpt.close()
    count = len(jax.tree.leaves(state.params))
    with pytest.raises(WorkdirError, match=rf"checkpoint .*/4 is damaged: {count} arrays hold NaN/Inf \(first: "
                                           r"params/.*\); delete that step directory to resume from an earlier one$"):
        train(get_task(config), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3", "4"]  # nothing rotated away
    shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))  # the message's advice resumes from step 3
    assert train(get_task(config), workdir)["step"] == 8
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 9))


def test_case7_full_disk_during_a_save_is_one_line_and_resume_works(trained, tmp_path, monkeypatch):
    """Orbax reports ENOSPC from its async writer as a ValueError naming os_error_code 28 (seen on a full
    2 MB tmpfs); the run stops with one line, the complete checkpoints stay, the rerun resumes."""
    workdir = copy(trained, tmp_path)
    config = toy_config({**CONFIG, "train.num_steps": 7})
    open_before = set(checkpoint_lib._OPEN)  # managers other tests in this process left are theirs
    real_save = checkpoint_lib.ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):
        if step == 6:
            raise ValueError('RESOURCE_EXHAUSTED: Error writing "step/0" in OCDBT database: Failed to write 101770 '
                             "bytes to file 5: No space left on device [os_error_code='28']")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint_lib.ocp.CheckpointManager, "save", full_disk)
    with pytest.raises(WorkdirError) as e:
        train(get_task(config), workdir)
    assert str(e.value) == (f"checkpoint {workdir}/checkpoints/6 could not be saved: the disk is full (no space left "
                            "on device); the complete checkpoints before it are intact: fix this and run the same "
                            "command to resume")
    assert not checkpoint_lib._OPEN - open_before, "the failed run left its checkpoint manager open"
    monkeypatch.undo()
    assert train(get_task(config), workdir)["step"] == 7  # space freed: the same command resumes from step 5
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 8))


def test_case8_resume_with_another_seed_is_one_line(trained, tmp_path):
    workdir = copy(trained, tmp_path)
    with pytest.raises(WorkdirError, match=r"^workdir .* was trained with config.seed=0, not 1; resume with "
                                           r"--config.seed=0 or use another --workdir$"):
        train(get_task(toy_config({**CONFIG, "train.num_steps": 6, "seed": 1})), workdir)
    assert read_metrics(workdir) == read_metrics(trained)


def test_case7_11_lost_manifest_and_missing_data_are_one_cli_line_without_background_tracebacks(trained, tmp_path):
    workdir = copy(trained, tmp_path)
    for name in ("manifest.ocdbt", os.path.join("ocdbt.process_0", "manifest.ocdbt")):
        os.remove(os.path.join(workdir, "checkpoints", "4", "state", name))
    for args, message in [
        ((f"--workdir={workdir}", "--config=configs/toy_lm.py:tiny", "--config.train.num_steps=6"),
         f"error: checkpoint {workdir}/checkpoints/4 could not be restored: NOT_FOUND: "),
        ((f"--workdir={tmp_path / 'codec'}", "--config=configs/codec.py:tiny", "--config.data.path=/nonexistent"),
         "error: config.data.path='/nonexistent': no prepared dataset in '/nonexistent'"),
    ]:
        out = run_cli("launch.train", *args, "--config.train.tensorboard=False", timeout=300)
        assert out.returncode == 2 and "Traceback" not in out.stderr and "Event loop" not in out.stderr, out.stderr[-3000:]
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(message) and "tensorstore_spec" not in errors[0], errors


def test_case11_deleted_or_truncated_shards_are_one_line(tmp_path):
    out = str(tmp_path / "data")
    prepare(PrepareSettings(source="synthetic", num_clips=8, seed=3, clip_seconds=2.0, sample_rate=8000), out,
            progress=False)
    shards = sorted(f for f in os.listdir(find_prepared(out)) if ".tfrecord" in f)
    config = default_data_config()
    config.path, config.sample_rate, config.crop_seconds = out, 8000, 1.0
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    path = os.path.join(find_prepared(out), shards[0])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=rf"^the prepared dataset at {out} is damaged \(.*\); prepare it again"):
        next(make_train_iterator(config, global_batch_size=8, mesh=mesh, seed=0))
    os.remove(path)
    with pytest.raises(DataError, match=rf"^the prepared dataset at {out} is damaged \(.*\); prepare it again"):
        next(make_train_iterator(config, global_batch_size=8, mesh=mesh, seed=0))


def test_case13_skipped_steps_are_warned_counted_and_strict_json(tmp_path, caplog):
    config = toy_config({"train.num_steps": 6})
    task = FaultyTask(config)
    task.loss_bad = {1: np.nan, 3: np.inf}
    with caplog.at_level(logging.WARNING):
        summary = train(task, str(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if "steps were skipped" in r.getMessage()]
    assert warnings == ["2 of 6 steps were skipped: non-finite loss or gradients (bad_steps in metrics.jsonl)"]
    text = (tmp_path / "final_metrics.json").read_text()
    final = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in final_metrics.json"))
    assert final == summary and final["bad_steps"] == 2 and final["status"] == "done" and '"step": 6,' in text
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
    assert [m["loss"] for m in read_metrics(tmp_path)][1:4:2] == ["nan", "inf"]


def test_case18_a_bundle_folder_of_another_stage_is_not_told_to_use_another_workdir():
    from melody_jax.training.checkpoint import check_compatible

    with pytest.raises(WorkdirError, match=r"^/b/dpd holds a checkpoint of stage 'dpd', not 'ssl'; point to the "
                                           r"folder of that stage \(a bundle's: rebuild the bundle\)$"):
        check_compatible({"stage": "dpd", "param_signature": {}}, "ssl", {}, "/b/dpd")


@pytest.mark.parametrize("filename, dropped", [("/site-packages/orbax/checkpoint/read.py", True),
                                               ("/site-packages/other/read.py", False)])
def test_asyncio_leftovers_of_orbax_reads_are_dropped_and_others_kept(filename, dropped):
    """The race behind case 7/11's stray traceback: asyncio logs a collected task's unretrieved exception
    whenever the garbage collector gets to it; only those raised inside Orbax are left out of the CLI's log."""
    import asyncio
    import gc

    from launch.common import _not_orbax_noise

    scope: dict = {}
    exec(compile("async def read():\n    raise ValueError('NOT_FOUND')\n", filename, "exec"), scope)
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    handler.addFilter(_not_orbax_noise)
    logging.getLogger("asyncio").addHandler(handler)
    try:
        loop = asyncio.new_event_loop()
        task = loop.create_task(scope["read"]())
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        del task
        gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(handler)
    assert [r.getMessage().splitlines()[0] for r in records] == ([] if dropped else
                                                                 ["Task exception was never retrieved"])
