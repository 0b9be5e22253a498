"""Every stage declares its data one way (melody_jax/tasks/sources.py): a registered `data.source`,
checked in one place with one-line errors, and `data.eval_split` naming its held-out split."""
import numpy as np
import pytest

from melody_jax.tasks.registry import REGISTRY, get_task
from melody_jax.tasks.sources import SOURCES, stream_seed
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import make_mesh
from tests.helpers import stage_config

STAGES = sorted(REGISTRY)


def config_error(config) -> str:
    with pytest.raises(ConfigError) as caught:
        get_task(config).validate()
    return str(caught.value)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_declares_a_registered_source(stage):
    config = stage_config(stage)
    assert config.data.source in SOURCES and config.data.source in get_task(config).sources


@pytest.mark.parametrize("stage", STAGES)
def test_unknown_source_is_one_line_naming_the_field_and_the_choices(stage):
    message = config_error(stage_config(stage, {"data.source": "nope", "data.path": "x"}))
    assert "\n" not in message and message.startswith("config.data.source='nope': stage " + stage)


@pytest.mark.parametrize("stage, source", [("vae_gan", "prepared_audio"), ("dpd", "cached"),
                                           ("semantic_lm", "frozen_models"), ("musicgen", "codec")])
def test_a_source_that_reads_a_path_refuses_an_empty_one(stage, source):
    message = config_error(stage_config(stage, {"data.source": source, "data.path": ""}))
    assert "\n" not in message and message.startswith(f"config.data.path is empty; data.source={source!r} needs ")


def test_eval_split_names_a_held_out_split_of_the_source():
    assert config_error(stage_config("toy_lm", {"data.eval_split": "train"})).startswith("config.data.eval_split='train'")
    assert config_error(stage_config("kmeans", {"data.eval_split": "validation"})).startswith("config.data.eval_split=")


@pytest.mark.parametrize("stage", ["toy_lm", "dpd", "semantic_lm", "musicgen"])
def test_empty_eval_split_means_no_evaluation(stage):
    config = stage_config(stage, {"data.eval_split": ""})
    assert get_task(config).eval_iterator(make_mesh(config.mesh)) is None


@pytest.mark.parametrize("stage", ["toy_lm", "dpd", "semantic_lm", "musicgen"])
def test_synthetic_held_out_stream_is_deterministic_and_apart_from_training(stage):
    config = stage_config(stage)
    mesh = make_mesh(config.mesh)

    def first(split_iterator: str) -> dict[str, np.ndarray]:
        task = get_task(config)
        return {k: np.asarray(v) for k, v in next(getattr(task, split_iterator)(mesh)).items()}

    train, held_out, again = first("train_iterator"), first("eval_iterator"), first("eval_iterator")
    for key in held_out:
        np.testing.assert_array_equal(held_out[key], again[key])
    assert any(not np.array_equal(train[k], held_out[k]) for k in train)
    assert stream_seed(0, "train") == 0 and len({stream_seed(0, s) for s in ("train", "validation", "test")}) == 3
