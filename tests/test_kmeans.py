"""JAX k-means (DESIGN §4.2): recovers known Gaussian centres, matches scikit-learn's inertia, re-seeds
empty clusters, and gives the same answer sharded over 8 CPU devices as on one."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from melody_jax.nn.kmeans import assign, fit_kmeans, kmeans_plusplus, lloyd_step, shard_rows
from melody_jax.training.sharding import make_mesh

K, D, PER = 16, 8, 64  # clusters, dims, points per cluster


def blobs(seed: int = 0, spread: float = 0.5):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(-10, 10, (K, D)).astype(np.float32)
    labels = np.repeat(np.arange(K), PER)
    x = centres[labels] + spread * rng.standard_normal((K * PER, D)).astype(np.float32)
    perm = rng.permutation(len(x))
    return x[perm], labels[perm], centres


def chunks(x: np.ndarray, n_chunks: int = 4):
    return x.reshape(n_chunks, -1, x.shape[-1]), np.ones((n_chunks, len(x) // n_chunks), np.float32)


def test_recovers_gaussian_centres_and_matches_sklearn_inertia():
    x, labels, centres = blobs()
    mesh = make_mesh({"data": -1})
    xs, ws = shard_rows(*chunks(x), mesh)
    assert len(xs.addressable_shards) == 8 and xs.sharding.spec[1] == ("data", "fsdp")
    ours = fit_kmeans(xs, ws, K, jax.random.key(0), iters=30, n_init=3, progress=False)
    sk = KMeans(K, init="k-means++", n_init=3, max_iter=30, random_state=0).fit(x)
    # Matched assignment of fitted to true centres (Hungarian): every centre within 0.2 of the truth
    # (σ = 0.5 per dim over 64 points gives a mean error of about 0.5·√(8/64) ≈ 0.18 in norm).
    fitted = np.asarray(ours.centroids)
    cost = np.linalg.norm(fitted[:, None] - centres[None], axis=-1)
    rows, cols = linear_sum_assignment(cost)
    assert cost[rows, cols].max() < 0.35, cost[rows, cols]
    # Assignments agree with the true labels up to that matching.
    pred = np.asarray(assign(jnp.asarray(x), ours.centroids))
    mapping = dict(zip(rows, cols))
    assert np.mean([mapping[p] == t for p, t in zip(pred, labels)]) == 1.0
    # Inertia (Σ squared distances, scikit-learn's definition) within 1 % of scikit-learn's.
    assert abs(ours.inertia - sk.inertia_) <= 0.01 * sk.inertia_, (ours.inertia, sk.inertia_)
    # The logged history falls (Lloyd never increases inertia) and ends at the returned value.
    assert all(b <= a * (1 + 1e-5) for a, b in zip(ours.history, ours.history[1:])), ours.history
    assert abs(ours.history[-1] - ours.inertia) <= 1e-4 * ours.inertia


def test_overlapping_clusters_match_sklearn_within_one_percent():
    """Harder case (clusters overlap, no exact optimum): same seeding count, inertia within 1 %."""
    x, _, _ = blobs(seed=1, spread=4.0)
    ours = fit_kmeans(*map(jnp.asarray, chunks(x)), K, jax.random.key(1), iters=100, n_init=4, progress=False)
    sk = KMeans(K, init="k-means++", n_init=4, max_iter=100, random_state=0).fit(x)
    assert abs(ours.inertia - sk.inertia_) <= 0.01 * sk.inertia_, (ours.inertia, sk.inertia_)


def test_sharded_equals_single_device_and_minibatch_is_close():
    x, _, _ = blobs(seed=2)
    xc, wc = chunks(x)
    key = jax.random.key(3)
    single = jax.device_put((jnp.asarray(xc), jnp.asarray(wc)), jax.devices()[0])
    sharded = shard_rows(xc, wc, make_mesh({"data": 4, "fsdp": 2}))
    init_1 = kmeans_plusplus(key, *single, K)
    init_8 = kmeans_plusplus(key, *sharded, K)
    np.testing.assert_allclose(np.asarray(init_8), np.asarray(init_1), atol=1e-5)
    new_1, s1 = lloyd_step(*single, init_1)
    new_8, s8 = lloyd_step(*sharded, init_8)
    np.testing.assert_allclose(np.asarray(new_8), np.asarray(new_1), atol=1e-4)
    np.testing.assert_allclose(float(s8.inertia), float(s1.inertia), rtol=1e-5)
    full = fit_kmeans(*sharded, K, key, iters=20, progress=False)
    mini = fit_kmeans(*sharded, K, key, iters=20, mode="minibatch", progress=False)
    assert mini.inertia <= 1.05 * full.inertia, (mini.inertia, full.inertia)


def test_empty_cluster_is_reseeded_at_the_worst_fitted_point():
    x = np.array([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.2, 0.0]], np.float32)
    far_away = jnp.array([[0.05, 0.0], [100.0, 100.0]])  # centre 1 gets no point
    new, s = lloyd_step(jnp.asarray(x[None]), jnp.ones((1, 4)), far_away)
    assert np.asarray(s.counts).tolist() == [4.0, 0.0]
    # Centre 0 moves to the mean of all four; centre 1 jumps to the point farthest from centre 0 (10.2, 0).
    np.testing.assert_allclose(np.asarray(new), [[5.075, 0.0], [10.2, 0.0]], atol=1e-5)
    new2, s2 = lloyd_step(jnp.asarray(x[None]), jnp.ones((1, 4)), new)
    assert np.asarray(s2.counts).tolist() == [2.0, 2.0]
    np.testing.assert_allclose(np.asarray(new2), [[0.05, 0.0], [10.1, 0.0]], atol=1e-5)


def test_padding_rows_are_ignored():
    """Zero-weight rows (padding) are never seeded from and change no statistic."""
    x, _, _ = blobs(seed=4)
    xc, wc = chunks(x)
    noisy = jnp.asarray(np.concatenate([xc, np.full((4, 8, D), 1e3, np.float32)], 1))  # 8 huge rows per chunk
    wn = jnp.asarray(np.concatenate([wc, np.zeros((4, 8), np.float32)], 1))
    for seed in range(3):
        assert np.abs(np.asarray(kmeans_plusplus(jax.random.key(seed), noisy, wn, K))).max() < 50
    init = kmeans_plusplus(jax.random.key(5), jnp.asarray(xc), jnp.asarray(wc), K)
    a, sa = lloyd_step(jnp.asarray(xc), jnp.asarray(wc), init)
    b, sb = lloyd_step(noisy, wn, init)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-4)
    np.testing.assert_allclose(float(sb.inertia), float(sa.inertia), rtol=1e-5)
    assert float(sb.counts.sum()) == K * PER
