"""Streamed k-means and RVQ fits (one chunk at a time, the data re-read every pass) give the in-memory fits.

Tolerance: centroids within 1e-5 (absolute, data of unit scale) and inertia within 1e-6 relative — the
streamed pass adds the same chunk statistics in the same order as the in-memory `lax.scan`, so only
XLA's fusion of the float sums can differ.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.nn.kmeans import (fit_kmeans_stream, init_from_sample, kmeans, kmeans_plusplus, lloyd_step,
                                  minibatch_step, shard_rows, stream_pass)
from melody_jax.tasks.rvq import _residual, fit_level
from melody_jax.training.sharding import make_mesh

K, C, N, D = 6, 4, 64, 8


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[C, N, D] points around K centres (scale ~1) and [C, N] weights, a few rows of padding (weight 0)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((K, D)) * 2
    x = (centres[rng.integers(0, K, C * N)] + 0.3 * rng.standard_normal((C * N, D))).astype(np.float32)
    w = np.ones(C * N, np.float32)
    w[-5:] = 0.0
    return x.reshape(C, N, D), w.reshape(C, N)


class Passes:
    """Chunks re-yielded every pass, counting the passes (what a streamed source does)."""

    def __init__(self, x, w):
        self.x, self.w, self.passes = x, w, 0

    def __call__(self):
        self.passes += 1
        return iter(zip(self.x, self.w))


@pytest.fixture(scope="module")
def data():
    mesh = make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    return shard_rows(*blobs(), mesh)


def test_full_lloyd_streamed_equals_in_memory(data):
    x, w = data
    key = jax.random.key(3)
    iters = 8
    streamed = fit_kmeans_stream(Passes(x, w), K, key, iters=iters, progress=False)
    c = kmeans_plusplus(jax.random.split(key, 1)[0], x, w, K)
    history = []
    for _ in range(iters):
        c, s = lloyd_step(x, w, c)
        history.append(float(s.inertia))
    np.testing.assert_allclose(np.asarray(streamed.centroids), np.asarray(c), atol=1e-5)
    np.testing.assert_allclose(streamed.history, history, rtol=1e-6)
    final = float(lloyd_step(x, w, c)[1].inertia)
    assert streamed.inertia == pytest.approx(final, rel=1e-6)


def test_minibatch_streamed_equals_in_memory(data):
    x, w = data
    init = kmeans_plusplus(jax.random.key(4), x, w, K)
    chunks = Passes(x, w)
    c, totals = init, jnp.zeros(K)
    c_mem, totals_mem = init, jnp.zeros(K)
    for _ in range(3):
        c, totals, inertia = stream_pass(chunks, c, "minibatch", totals)
        c_mem, totals_mem, inertia_mem = minibatch_step(x, w, c_mem, totals_mem)
        np.testing.assert_allclose(np.asarray(c), np.asarray(c_mem), atol=1e-5)
        assert float(inertia) == pytest.approx(float(inertia_mem), rel=1e-6)
    np.testing.assert_allclose(np.asarray(totals), np.asarray(totals_mem), rtol=1e-6)
    assert chunks.passes == 3


def test_seeding_on_a_bounded_sample(data):
    """k-means++ reads only the first `max_chunks` chunks, and the fit still reaches the full-seeded one's
    inertia within 2 % on these blobs."""
    x, w = data
    key = jax.random.key(5)
    seen = []

    def chunks():
        for i in range(C):
            seen.append(i)
            yield x[i], w[i]

    init = init_from_sample(chunks, K, key, 2)
    assert seen == [0, 1]
    np.testing.assert_allclose(np.asarray(init), np.asarray(kmeans_plusplus(key, x[:2], w[:2], K)), atol=0)
    sampled = fit_kmeans_stream(Passes(x, w), K, key, iters=15, init_chunks=1, n_init=2, progress=False)
    full = fit_kmeans_stream(Passes(x, w), K, key, iters=15, n_init=2, progress=False)
    assert sampled.inertia <= 1.02 * full.inertia, (sampled.inertia, full.inertia)


def test_rvq_levels_streamed_equal_in_memory_fit():
    """Two residual levels fitted over 4 chunks of embeddings equal today's in-memory `kmeans` of each
    level's residual (all rows at once, the same seeding key)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((C * N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    chunks = Passes(x.reshape(C, N, D), np.ones((C, N), np.float32))
    codebooks = jnp.zeros((2, K, D))
    expected = codebooks
    for level in range(2):
        key = jax.random.key(level)
        codebooks, sums = fit_level(chunks, codebooks, level, key, iters=6, init_chunks=0)
        residual = _residual(expected, jnp.asarray(x))
        expected = expected.at[level].set(kmeans(residual, K, jax.random.split(key, 1)[0], 6))
        np.testing.assert_allclose(np.asarray(codebooks), np.asarray(expected), atol=1e-5)
        error = float(jnp.sum((x - _reconstructed(expected, x)) ** 2))
        assert float(sums["error"]) == pytest.approx(error, rel=1e-5)
        assert float(sums["rows"]) == C * N and float(sums["counts"].sum()) == C * N


def _reconstructed(codebooks, x):
    return x - _residual(codebooks, jnp.asarray(x))
