"""The DPD's paper recipe: the chunks continuation regenerates are chunks multi-chunk training noised,
token alignment (not in the paper) off for paper/base, MeLoDy's sampling defaults (`config.sample`), and the
input scale (1 in the paper) that training and every sampler share."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.dpd import get_config
from melody_jax.diffusion import angles, samplers
from melody_jax.diffusion.guidance import classifier_free_guidance
from melody_jax.frozen.stage_models import build_model
from melody_jax.models.dpd import guidance_conditions, velocity_fn
from melody_jax.pipelines.dpd_sampling import (SAMPLE_DEFAULTS, continue_sampled_latents, inpaint_plan,
                                               inpaint_sampled_latents, inpaint_windows, sample_defaults,
                                               sample_latents)
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
    with pytest.raises(ConfigError, match="input_scale"):
        DPDTask(stage_config("dpd", {"model.input_scale": 0.0})).validate()
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


def test_input_scale_is_the_space_the_task_trains_and_the_samplers_run_in():
    """A DPD with input scale s trains on s · latents (its loss and fixed-angle measures equal a scale-1 DPD's on
    scaled latents, same draws); a stored config without the field (bundles before it) loads at 1; and MeLoDy's
    samplers run that DPD with the samplers' `scale=s`."""
    scale = 5.8
    task, plain = (DPDTask(stage_config("dpd", {"model.input_scale": v})) for v in (scale, 1.0))
    assert (task.model.input_scale, plain.model.input_scale, get_config("paper").model.input_scale) == (scale, 1, 1)
    older = stage_config("dpd")
    del older.model["input_scale"]
    assert build_model(older).module.input_scale == 1.0
    c = task.config
    k_lat, k_tok, k_init, k_loss = jax.random.split(jax.random.key(0), 4)
    latents = jax.random.uniform(k_lat, (4, c.data.latent_length, c.model.latent_dim), minval=-0.4, maxval=0.4)
    tokens = jax.random.randint(k_tok, (4, c.data.token_length), 0, c.model.vocab_size)
    params = task.init_params(k_init)
    for train in (True, False):
        loss, _ = task.loss(params, {"latents": latents, "semantic_tokens": tokens}, k_loss, train)
        same, _ = plain.loss(params, {"latents": latents * scale, "semantic_tokens": tokens}, k_loss, train)
        np.testing.assert_allclose(loss, same, rtol=1e-5)
    fixed = task.fixed_angle_metrics(params, {"latents": latents, "semantic_tokens": tokens}, k_loss, math.pi / 4)
    same = plain.fixed_angle_metrics(params, {"latents": latents * scale, "semantic_tokens": tokens}, k_loss,
                                     math.pi / 4)
    np.testing.assert_allclose([fixed[k] for k in sorted(fixed)], [same[k] for k in sorted(same)], rtol=1e-5)

    model, cfg, fpt = task.model, 2.5, c.data.latent_length // c.data.token_length
    vfn = classifier_free_guidance(velocity_fn(model, {"params": params}), cfg)
    kw = dict(num_steps=3, schedule="paper")
    out = sample_latents(model, params, tokens, k_loss, cfg, length=latents.shape[1], **kw)
    want = samplers.generate(vfn, k_loss, guidance_conditions(tokens), latents.shape, scale=scale, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5)
    assert not np.allclose(out, samplers.generate(vfn, k_loss, guidance_conditions(tokens), latents.shape, **kw),
                           atol=1e-3)
    mask = jnp.broadcast_to(jnp.arange(latents.shape[1]) >= latents.shape[1] // 2, latents.shape[:2])
    out = inpaint_sampled_latents(model, params, latents, mask, tokens, k_loss, cfg, **kw)
    want = samplers.inpaint(vfn, k_loss, latents, mask, guidance_conditions(tokens), scale=scale, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5)
    plan = inpaint_plan(c.data.token_length, 4, 12, c.data.token_length, 4)  # one window: the whole crop
    out = inpaint_windows(model, params, latents, tokens, jnp.asarray(plan), k_loss, cfg,
                          window_tokens=c.data.token_length, frames_per_token=fpt, **kw)
    span = (jnp.arange(latents.shape[1]) >= 4 * fpt) & (jnp.arange(latents.shape[1]) < 12 * fpt)
    want = samplers.inpaint(vfn, samplers.split_keys(k_loss, 1)[0], latents, span, guidance_conditions(tokens),
                            scale=scale, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5)
    windows = jnp.stack([tokens, tokens[::-1]])
    chunk = math.ceil(c.data.token_length / c.model.num_chunks) * fpt
    out = continue_sampled_latents(model, params, latents, windows, k_loss, cfg, window_length=latents.shape[1],
                                   chunk_length=chunk, **kw)
    want = samplers.continue_latents(vfn, k_loss, latents, jax.vmap(guidance_conditions)(windows),
                                     window_length=latents.shape[1], chunk_length=chunk, scale=scale, **kw)
    np.testing.assert_allclose(out, want, atol=1e-5)
