"""The DPD's paper recipe: the chunks continuation regenerates are chunks multi-chunk training noised,
token alignment (not in the paper) off for paper/base, and MeLoDy's sampling defaults (`config.sample`)."""
import math

import jax
import ml_collections
import numpy as np
import pytest

from configs.dpd import get_config
from melody_jax.diffusion import angles
from melody_jax.pipelines.dpd_sampling import SAMPLE_DEFAULTS, sample_defaults
from melody_jax.pipelines.generation import AudioInputError, Generator
from melody_jax.tasks.dpd import DPDTask, training_chunk_length
from melody_jax.training.errors import ConfigError
from tests.helpers import stage_config


def test_training_chunks_end_with_the_continuation_chunk():
    c = get_config("paper")
    m, d = c.model, c.data
    assert (m.chunk_edges, m.align_tokens) == ("tokens", False)
    fpt = d.latent_length // d.token_length  # 10 latent frames per semantic token
    continuation = math.ceil(d.token_length / m.num_chunks) * fpt  # what MeLoDy's Algorithm 2 regenerates
    assert training_chunk_length(c) == continuation == 630
    edges = angles.chunk_boundaries(d.latent_length, m.num_chunks, training_chunk_length(c))
    np.testing.assert_array_equal(edges, [0, 610, 1240, 1870, 2500])
    even = angles.chunk_boundaries(d.latent_length, m.num_chunks)
    assert even[-1] - even[-2] == 625  # today's split: the last chunk 5 frames short of the regenerated one
    assert all(e % fpt == 0 for e in edges)  # every edge on a token boundary


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_tiny_and_small_keep_even_chunks_and_alignment(preset):
    c = get_config(preset)
    assert (c.model.chunk_edges, c.model.align_tokens, training_chunk_length(c)) == ("even", True, None)


def test_chunked_angles_follow_the_edges():
    delta = np.asarray(angles.multi_chunk_angles(jax.random.key(0), 3, 25, 3, chunk_length=8))
    for a, b in [(0, 9), (9, 17), (17, 25)]:  # 25 − 2·8 = 9 frames first
        np.testing.assert_array_equal(delta[:, a:b], delta[:, a:a + 1] * np.ones((1, b - a)))
    assert (delta[:, 8] != delta[:, 9]).all() and (delta[:, 16] != delta[:, 17]).all()
    with pytest.raises(ValueError, match="leave none"):
        angles.chunk_boundaries(16, 3, 8)


def test_chunk_edges_config_is_checked():
    with pytest.raises(ConfigError, match="chunk_edges"):
        DPDTask(stage_config("dpd", {"model.chunk_edges": "halves"})).validate()
    with pytest.raises(ConfigError, match="continuation_share"):
        DPDTask(stage_config("dpd", {"model.continuation_share": 1.0})).validate()
    with pytest.raises(ConfigError, match="chunk_edges"):  # 4 chunks of 4 tokens (40 frames) leave none of 160
        DPDTask(stage_config("dpd", {"model.chunk_edges": "tokens", "model.num_chunks": 5})).validate()
    with pytest.raises(ConfigError, match="sample.schedule"):
        DPDTask(stage_config("dpd", {"sample.schedule": "cosine"})).validate()
    DPDTask(stage_config("dpd", {"model.chunk_edges": "tokens"})).validate()


def test_melody_sampling_defaults_come_from_the_dpd_config_sample_block():
    """Every preset stores MeLoDy's sampling; a bundle predating a field gets its default in one place;
    a call's None leaves the bundle's value and a name the system does not take is an error."""
    for preset in ("tiny", "paper"):
        assert dict(get_config(preset).sample) == SAMPLE_DEFAULTS
    assert (SAMPLE_DEFAULTS["steps"], SAMPLE_DEFAULTS["cfg"], SAMPLE_DEFAULTS["schedule"]) == (10, 2.5, "paper")
    older = ml_collections.ConfigDict({"sample": {"schedule": "uniform"}})  # before steps, cfg, … were stored
    assert sample_defaults(older) == {**SAMPLE_DEFAULTS, "schedule": "uniform"}
    assert sample_defaults(ml_collections.ConfigDict()) == SAMPLE_DEFAULTS

    class Stub(Generator):
        name, sample_rate, defaults = "stub", 8000, sample_defaults(older)
        generate = generate_continuation = None

    stub = Stub()
    assert stub.settings(None, steps=3, cfg=None) == {**sample_defaults(older), "steps": 3}
    assert stub.settings(2.0, window_frames=None)["duration"] == 2.0  # None: a flag this system ignores
    with pytest.raises(AudioInputError, match="stub takes no sampling argument window_frames"):
        stub.settings(window_frames=4)
    with pytest.raises(AudioInputError, match="stub has no unconditional mode"):
        stub.generate_unconditional(1)
    for field, value in (("steps", 0), ("cfg", -1.0), ("top_p", 0.0)):
        with pytest.raises(ConfigError, match=f"sample.{field}"):
            DPDTask(stage_config("dpd", {f"sample.{field}": value})).validate()
