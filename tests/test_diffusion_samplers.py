"""Samplers: an oracle velocity recovers the data exactly; known frames are never touched; CFG; one jit."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.diffusion import angles, samplers
from melody_jax.diffusion.guidance import classifier_free_guidance

B, L, D = 2, 12, 3
ATOL = 2e-5  # float32 rotations over up to 20 steps


def oracle(z_noisy, delta, cond, scale=1.0):
    """The true velocity at the current angle, from the clean latent and the noise the sampler drew, for a
    network that diffuses scale · z."""
    z_true, eps = cond
    return angles.velocity(scale * z_true, eps, delta)


SCALES = [1.0, 5.8]  # the paper's, and the 2-hour recipe's DPD (latents of std 0.17 to unit variance)


def toy_velocity(z_noisy, delta, cond):
    """A cheap stand-in model whose output depends on every input (cond is [B] or [B, C])."""
    c = cond.reshape(cond.shape[0], 1, -1)[..., :1]
    return 0.3 * z_noisy + jnp.sin(delta)[..., None] * c + 0.1 * jnp.cumsum(z_noisy, axis=1)


def clean(seed, shape=(B, L, D)):
    return jax.random.uniform(jax.random.key(seed), shape, minval=-0.9, maxval=0.9)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("schedule", ["paper", "uniform"])
@pytest.mark.parametrize("num_steps", [1, 4, 20])
def test_generate_with_oracle_recovers_data(schedule, num_steps, scale):
    key, z = jax.random.key(3), clean(0)
    eps = jax.random.normal(key, z.shape)
    out = samplers.generate(functools.partial(oracle, scale=scale), key, (z, eps), z.shape, num_steps=num_steps,
                            schedule=schedule, scale=scale)
    np.testing.assert_allclose(out, z, rtol=0, atol=ATOL)


def test_scale_is_the_space_the_noise_starts_in():
    """Sampled at another scale than its network's, the oracle's data is not recovered: the loop's start is
    unit noise in the scaled space, not in the latents'."""
    key, z = jax.random.key(3), clean(0)
    eps = jax.random.normal(key, z.shape)
    out = samplers.generate(functools.partial(oracle, scale=5.8), key, (z, eps), z.shape, num_steps=4)
    assert float(jnp.abs(out - z).max()) > 0.1


def test_generate_clips_to_unit_range():
    out = samplers.generate(lambda z, d, c: -3.0 * jnp.ones_like(z), jax.random.key(0), None, (B, L, D), num_steps=4)
    assert float(out.max()) == 1.0 and float(out.min()) >= -1.0


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("schedule", ["paper", "uniform"])
def test_inpaint_keeps_outside_and_oracle_fills_inside(schedule, scale):
    key, z = jax.random.key(5), clean(1)
    mask = jnp.zeros((B, L), bool).at[0, 3:7].set(True).at[1, 8:].set(True)
    damaged = jnp.where(mask[..., None], 7.0, z)  # the region's content must not leak in
    eps = jax.random.normal(key, z.shape)
    out = samplers.inpaint(functools.partial(oracle, scale=scale), key, damaged, mask, (z, eps), num_steps=6,
                           schedule=schedule, scale=scale)
    np.testing.assert_array_equal(np.where(mask[..., None], 0, out), np.where(mask[..., None], 0, z))
    np.testing.assert_allclose(out, z, rtol=0, atol=ATOL)
    # A 1-D mask applies to every example; outside stays bit-exact with any model.
    out = samplers.inpaint(toy_velocity, key, z, jnp.arange(L) < 4, jnp.ones(B), num_steps=3)
    np.testing.assert_array_equal(out[:, 4:], z[:, 4:])
    assert not np.allclose(out[:, :4], z[:, :4], atol=1e-3)


@pytest.mark.parametrize("scale", SCALES)
def test_continue_window_context_unchanged_and_oracle_exact(scale):
    key, window, chunk = jax.random.key(9), clean(2), 4
    new_true = clean(3, (B, chunk, D))
    eps_new = jax.random.normal(key, (B, chunk, D))
    z_true = jnp.concatenate([window[:, chunk:], new_true], axis=1)
    eps = jnp.concatenate([jnp.zeros((B, L - chunk, D)), eps_new], axis=1)
    out = samplers.continue_window(functools.partial(oracle, scale=scale), key, window, (z_true, eps),
                                   chunk_length=chunk, num_steps=5, scale=scale)
    np.testing.assert_array_equal(out[:, : L - chunk], window[:, chunk:])
    np.testing.assert_allclose(out[:, L - chunk :], new_true, rtol=0, atol=ATOL)


def test_continue_window_angle_vector():
    seen = []

    def spy(z, delta, cond):
        jax.debug.callback(lambda d: seen.append(np.asarray(d)), delta, ordered=True)
        return jnp.zeros_like(z)

    samplers.continue_window(spy, jax.random.key(0), clean(4), None, chunk_length=3, num_steps=4)
    deltas, _ = angles.sampling_angles(4)
    assert len(seen) == 4
    for delta, delta_t in zip(seen, deltas):  # [0]×(L−L_M) ⊕ [δ_t]×L_M at every step
        np.testing.assert_array_equal(delta[:, : L - 3], 0.0)
        np.testing.assert_array_equal(delta[:, L - 3 :], delta_t)


def test_continue_latents_three_times():
    z0 = clean(6, (B, 16, D))
    window, chunk, n = 12, samplers.continuation_chunk_length(12, 4), 3
    conds = jnp.arange(n * B, dtype=jnp.float32).reshape(n, B)
    key = jax.random.key(11)
    out = samplers.continue_latents(toy_velocity, key, z0, conds, window_length=window,
                                    chunk_length=chunk, num_steps=3)
    assert chunk == 3 and out.shape == (B, 16 + n * chunk, D)
    np.testing.assert_array_equal(out[:, :16], z0)
    assert float(jnp.abs(out).max()) <= 1.0
    # Equals three explicit windows, each starting from the last window.
    w = z0[:, -window:]
    for k, cond in zip(jax.random.split(key, n), conds):
        w = samplers.continue_window(toy_velocity, k, w, cond, chunk_length=chunk, num_steps=3)
    np.testing.assert_allclose(out[:, -window:], w, rtol=0, atol=1e-6)


def test_continuation_arguments_checked():
    with pytest.raises(ValueError, match="chunk_length"):
        samplers.continue_window(toy_velocity, jax.random.key(0), clean(0), jnp.ones(B), chunk_length=L, num_steps=2)
    with pytest.raises(ValueError, match="window_length"):
        samplers.continue_latents(toy_velocity, jax.random.key(0), clean(0), jnp.ones((1, B)),
                                  window_length=L + 1, chunk_length=2, num_steps=2)


def test_cfg_formula_one_batch_and_scale_one_is_conditional():
    calls = []

    def model(z, delta, cond):
        calls.append(z.shape[0])
        return toy_velocity(z, delta, cond)

    z, delta = clean(7), jnp.full((B, L), 0.7)
    c, u = jnp.array([1.0, -2.0]), jnp.zeros(B)
    v_c, v_u = toy_velocity(z, delta, c), toy_velocity(z, delta, u)
    for scale in (0.0, 1.0, 2.5):
        v = classifier_free_guidance(model, scale)(z, delta, (c, u))
        np.testing.assert_allclose(v, v_u + scale * (v_c - v_u), rtol=0, atol=1e-5)
    assert calls == [2 * B] * 3  # one call per evaluation, both branches in one batch
    np.testing.assert_array_equal(classifier_free_guidance(model, 1.0)(z, delta, (c, u)), v_c)

    key, shape = jax.random.key(4), (B, L, D)
    plain = samplers.generate(toy_velocity, key, c, shape, num_steps=5)
    one = samplers.generate(classifier_free_guidance(toy_velocity, 1.0), key, (c, u), shape, num_steps=5)
    strong = samplers.generate(classifier_free_guidance(toy_velocity, 2.5), key, (c, u), shape, num_steps=5)
    np.testing.assert_array_equal(one, plain)
    assert float(jnp.abs(strong - plain).max()) > 1e-2


def _compiles_once(sampler, *args):
    """Runs a jitted sampler with two keys: one trace, one model trace for all steps, keys matter."""
    calls = []

    def model(z, delta, cond):
        calls.append(1)
        return toy_velocity(z, delta, cond)

    fn = jax.jit(functools.partial(sampler, classifier_free_guidance(model, 2.5)))
    a = fn(jax.random.key(0), *args)
    b = fn(jax.random.key(1), *args)
    assert fn._cache_size() == 1
    assert len(calls) == 1  # the velocity function is traced once: every step is inside lax
    assert not np.allclose(a, b)
    return a


def test_every_sampler_is_one_jitted_program():
    cond = (jnp.ones(B), jnp.zeros(B))
    _compiles_once(functools.partial(samplers.generate, shape=(B, L, D), num_steps=8), cond)
    mask = jnp.arange(L) >= 5
    _compiles_once(lambda vfn, key, z, c: samplers.inpaint(vfn, key, z, mask, c, num_steps=8), clean(0), cond)
    _compiles_once(functools.partial(samplers.continue_window, chunk_length=3, num_steps=8), clean(0), cond)
    conds = (jnp.ones((3, B)), jnp.zeros((3, B)))
    out = _compiles_once(
        functools.partial(samplers.continue_latents, window_length=L, chunk_length=3, num_steps=8),
        clean(0), conds,
    )
    assert out.shape == (B, L + 9, D)
