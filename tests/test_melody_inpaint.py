"""MeLoDy inpainting (issue 26): the DPD fills a long span window by window (`inpaint_plan`), each window
the DPD's trained length, the rest of the clip untouched. A tiny untrained DPD: plumbing, not quality.
The pipeline's inpainting (LM span resampled by the right context, DPD calls per window) is checked in
test_melody_pipeline.py, on its bundle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from melody_jax.diffusion.samplers import split_keys
from melody_jax.pipelines.dpd_sampling import inpaint_plan, inpaint_sampled_latents, inpaint_windows
from melody_jax.pipelines.melody import row_keys
from melody_jax.tasks.registry import get_task
from tests.helpers import stage_config


def test_plan_covers_the_span_once_in_whole_windows():
    # hand-worked: windows of 16 keep 12 tokens before 4 new ones until the rest fits, then centre on it
    np.testing.assert_array_equal(inpaint_plan(100, 10, 50, 16, 4), [
        (0, 10, 16), (4, 16, 20), (8, 20, 24), (12, 24, 28), (16, 28, 32), (20, 32, 36), (35, 36, 50)])
    np.testing.assert_array_equal(inpaint_plan(12, 3, 7, 16, 4), [(0, 3, 7)])  # shorter than a window: the clip
    np.testing.assert_array_equal(inpaint_plan(100, 40, 44, 16, 4), [(34, 40, 44)])  # 6 tokens each side
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, window = int(rng.integers(1, 120)), int(rng.integers(4, 40))
        chunk = int(rng.integers(1, window + 1))
        start = int(rng.integers(0, n))
        end = int(rng.integers(start + 1, n + 1))
        plan = inpaint_plan(n, start, end, window, chunk)
        assert plan[0, 1] == start and plan[-1, 2] == end and (plan[1:, 1] == plan[:-1, 2]).all()  # once, in order
        assert (plan[:, 0] >= 0).all() and (plan[:, 0] + min(window, n) <= n).all()
        assert (plan[:, 0] <= plan[:, 1]).all() and (plan[:, 2] <= plan[:, 0] + min(window, n)).all()


@pytest.fixture(scope="module")
def dpd():
    task = get_task(stage_config("dpd"))
    return task.model, nn.meta.unbox(task.init_params(jax.random.key(0))), task.config


def test_windows_equal_one_dpd_call_each_and_keep_the_rest(dpd):
    model, params, config = dpd
    window = config.data.token_length
    fpt = config.data.latent_length // window
    n, start, end = 40, 6, 36  # 2.5 windows of 16 tokens
    plan = inpaint_plan(n, start, end, window, 4)
    np.testing.assert_array_equal(plan, [(0, 6, 16), (4, 16, 20), (20, 20, 36)])
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.uniform(-1, 1, (2, n * fpt, model.latent_dim)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, model.vocab_size, (2, n)), jnp.int32)
    keys = row_keys(3, 2)
    out = np.asarray(inpaint_windows(model, params, z, tokens, jnp.asarray(plan), keys, 2.5, window_tokens=window,
                                     frames_per_token=fpt, num_steps=2, schedule="paper"))
    assert out.shape == z.shape
    span = (np.arange(n * fpt) >= start * fpt) & (np.arange(n * fpt) < end * fpt)
    np.testing.assert_array_equal(out[:, ~span], np.asarray(z)[:, ~span])
    assert np.abs(out[:, span] - np.asarray(z)[:, span]).mean() > 1e-2
    # the reference: one DPD inpainting call per window, in order, with the window's key
    expected = z
    for (first, new, stop), key in zip(plan, split_keys(keys, len(plan))):
        lo = first * fpt
        mask = (np.arange(lo, lo + window * fpt) >= new * fpt) & (np.arange(lo, lo + window * fpt) < stop * fpt)
        filled = inpaint_sampled_latents(model, params, expected[:, lo:lo + window * fpt], jnp.asarray(mask),
                                         tokens[:, first:first + window], key, 2.5, num_steps=2, schedule="paper")
        expected = expected.at[:, lo:lo + window * fpt].set(filled)
    np.testing.assert_allclose(out, np.asarray(expected), atol=1e-5)
