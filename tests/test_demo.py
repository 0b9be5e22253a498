"""`launch.demo` stops at a stage that did not finish (a SIGTERM or Ctrl-C preempts the training loop,
which saves and returns): the next stage must not start on a half-trained upstream."""
import pytest

from launch import demo
from tests.helpers import stage_config


def test_a_preempted_stage_stops_the_demo_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("melody_jax.training.loop.train", lambda task, workdir: {"status": "preempted", "step": 3})
    log = {}
    with pytest.raises(SystemExit) as stop:
        demo.train_stage("kmeans", stage_config("kmeans"), str(tmp_path / "kmeans"), log)
    assert str(stop.value) == (f"[demo] kmeans preempted at step 3 (saved in {tmp_path / 'kmeans'}); "
                               "run the demo again to resume")
    assert log == {}


def test_a_finished_stage_is_logged(tmp_path, monkeypatch):
    monkeypatch.setattr("melody_jax.training.loop.train", lambda task, workdir: {"status": "done", "step": 5})
    log = {}
    demo.train_stage("kmeans", stage_config("kmeans"), str(tmp_path / "kmeans"), log)
    assert log["kmeans"]["status"] == "done" and log["kmeans"]["step"] == 5
