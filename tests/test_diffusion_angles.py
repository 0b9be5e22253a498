"""Angle diffusion maths: noising identities, multi-chunk angles, schedules."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.diffusion import angles


@pytest.mark.parametrize("num_steps", range(1, 51))
def test_paper_schedule_sums_to_half_pi_and_first_step_is_largest(num_steps):
    omegas = angles.angle_steps(num_steps, "paper")
    assert omegas.shape == (num_steps,)
    np.testing.assert_allclose(omegas.sum(), math.pi / 2, rtol=0, atol=1e-12)
    assert omegas[0] == omegas.max()
    assert np.all(np.diff(omegas) < 0) or num_steps == 1


def test_paper_schedule_values():
    # T = 2: ω_2 = π/12 + 2π·2/18 = 11π/36, ω_1 = π/12 + 2π/18 = 7π/36.
    np.testing.assert_allclose(angles.angle_steps(2, "paper"), [11 * math.pi / 36, 7 * math.pi / 36])


@pytest.mark.parametrize("num_steps", [1, 7, 20])
def test_uniform_schedule_and_sampling_angles(num_steps):
    np.testing.assert_allclose(angles.angle_steps(num_steps, "uniform"), math.pi / (2 * num_steps))
    for schedule in ("paper", "uniform"):
        deltas, omegas = angles.sampling_angles(num_steps, schedule)
        assert deltas.dtype == omegas.dtype == np.float32
        assert deltas[0] == np.float32(math.pi / 2)
        np.testing.assert_allclose(deltas[-1] - omegas[-1], 0.0, atol=1e-7)
        np.testing.assert_allclose(deltas[1:], deltas[:-1] - omegas[:-1], atol=1e-6)


def test_bad_schedule_and_steps():
    with pytest.raises(ValueError, match="schedule"):
        angles.angle_steps(4, "cosine")
    with pytest.raises(ValueError, match="num_steps"):
        angles.angle_steps(0)


def test_noise_velocity_clean_identities():
    kz, ke, kd = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(kz, (2, 9, 4))
    eps = jax.random.normal(ke, (2, 9, 4))
    delta = jax.random.uniform(kd, (2, 9), minval=0, maxval=math.pi / 2)
    z_delta = angles.add_noise(z, eps, delta)
    v = angles.velocity(z, eps, delta)
    np.testing.assert_allclose(angles.predict_clean(z_delta, v, delta), z, atol=1e-5)
    np.testing.assert_allclose(angles.predict_noise(z_delta, v, delta), eps, atol=1e-5)
    # v is the derivative of z_δ with respect to δ.
    dz = jax.jvp(lambda d: angles.add_noise(z, eps, d), (delta,), (jnp.ones_like(delta),))[1]
    np.testing.assert_allclose(dz, v, atol=1e-5)
    # Extremes: δ = 0 is data, δ = π/2 is noise.
    np.testing.assert_array_equal(angles.add_noise(z, eps, jnp.zeros((2, 9))), z)
    np.testing.assert_allclose(angles.add_noise(z, eps, jnp.full((2, 9), math.pi / 2)), eps, atol=1e-6)


def test_angle_step_moves_along_the_circle():
    z, eps = jnp.ones((1, 3, 2)), -jnp.ones((1, 3, 2))
    delta, omega = 1.2, 0.5
    z_delta = angles.add_noise(z, eps, jnp.full((1, 3), delta))
    v = angles.velocity(z, eps, jnp.full((1, 3), delta))
    expected = angles.add_noise(z, eps, jnp.full((1, 3), delta - omega))
    np.testing.assert_allclose(angles.angle_step(z_delta, v, omega), expected, atol=1e-6)


@pytest.mark.parametrize("length,num_chunks", [(2500, 4), (10, 3), (7, 7), (5, 1)])
def test_chunk_boundaries(length, num_chunks):
    edges = angles.chunk_boundaries(length, num_chunks)
    assert edges[0] == 0 and edges[-1] == length and len(edges) == num_chunks + 1
    np.testing.assert_array_equal(edges, [m * length // num_chunks for m in range(num_chunks + 1)])
    index = angles.chunk_index(length, num_chunks)
    np.testing.assert_array_equal(np.bincount(index, minlength=num_chunks), np.diff(edges))
    assert np.all(np.diff(index) >= 0)


def test_multi_chunk_angles_constant_per_chunk_independent_across():
    delta = np.asarray(angles.multi_chunk_angles(jax.random.key(1), 64, 10, 3))
    assert delta.shape == (64, 10)
    assert delta.min() >= 0 and delta.max() <= math.pi / 2
    edges = angles.chunk_boundaries(10, 3)  # [0, 3, 6, 10]
    per_chunk = [delta[:, a:b] for a, b in zip(edges[:-1], edges[1:])]
    for chunk in per_chunk:
        np.testing.assert_array_equal(chunk, chunk[:, :1] * np.ones_like(chunk))
    firsts = np.stack([c[:, 0] for c in per_chunk])
    assert len(np.unique(firsts)) == firsts.size  # independent draws, per chunk and example
    assert abs(firsts.mean() - math.pi / 4) < 0.15  # U[0, π/2] has mean π/4; 192 draws, 4.5 σ


def test_continuation_share_gives_some_examples_a_continuation_steps_angles():
    """Algorithm 2 denoises the last chunk with the others clean: that share of examples trains on
    exactly that vector; the rest keep the independent draws they would have had without it."""
    key, batch, length, chunks = jax.random.key(5), 2000, 12, 4
    plain = np.asarray(angles.multi_chunk_angles(key, batch, length, chunks))
    mixed = np.asarray(angles.multi_chunk_angles(key, batch, length, chunks, continuation_share=0.3))
    last = angles.chunk_boundaries(length, chunks)[-2]
    np.testing.assert_array_equal(mixed[:, last:], plain[:, last:])
    steps = (mixed[:, :last] == 0).all(1)
    np.testing.assert_array_equal(mixed[~steps], plain[~steps])
    assert abs(steps.mean() - 0.3) < 0.045  # binomial σ ≈ 0.010: 4.4 σ
    assert (plain[:, :last] > 0).all()  # the zeros come from the share, not the draws


def test_multi_chunk_noising_targets():
    z = jax.random.uniform(jax.random.key(2), (3, 12, 4), minval=-1, maxval=1)
    batch = angles.multi_chunk_noising(jax.random.key(3), z, num_chunks=4)
    assert batch.z_noisy.shape == batch.target.shape == z.shape and batch.delta.shape == (3, 12)
    np.testing.assert_allclose(angles.predict_clean(batch.z_noisy, batch.target, batch.delta), z, atol=1e-5)
