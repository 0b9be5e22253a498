"""The one k-means (DESIGN §4.2, §4.3, §6): k-means++ seeding, then full Lloyd (sums accumulated over
chunks) or mini-batch (Sculley) steps, with empty clusters re-seeded at the worst-fitted points. Used by
the kmeans and rvq stages (streamed: `init_from_sample`, `stream_pass`, `fit_kmeans_stream` see one chunk
at a time and re-read the data each pass, so no split has to fit in memory) and VQ initialisation
(`kmeans`, traceable).

Data layout: `x [C, N, D]` = C chunks of N rows whose row axis is sharded over the mesh's batch axes
(`shard_rows`), `w [C, N]` row weights (0 = padding). Every reduction over rows is a sum or an argmax
that GSPMD turns into all-reduces, and rows are picked by one-hot contractions rather than
gathers, so no device ever holds another's rows. Centroids `[K, D]` are replicated.
"""
from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from melody_jax.training.sharding import BATCH_AXES

_HIGHEST = jax.lax.Precision.HIGHEST


def squared_distances(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """[..., D] × [K, D] → [..., K] as ‖x‖² − 2x·c + ‖c‖² (clamped at 0)."""
    cross = jnp.einsum("...d,kd->...k", x, centroids, precision=_HIGHEST)
    d2 = jnp.sum(x * x, -1, keepdims=True) - 2.0 * cross + jnp.sum(centroids * centroids, -1)
    return jnp.maximum(d2, 0.0)


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """int32 [...]: index of the nearest centroid of each row of x [..., D]."""
    return jnp.argmin(squared_distances(x.astype(jnp.float32), centroids), -1).astype(jnp.int32)


def shard_rows(x: np.ndarray | jax.Array, w: np.ndarray | jax.Array, mesh: jax.sharding.Mesh
               ) -> tuple[jax.Array, jax.Array]:
    """Places chunks [C, N, D] and weights [C, N] with rows over the batch axes (N must divide evenly)."""
    rows = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES))
    return (jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, None))),
            jax.device_put(jnp.asarray(w, jnp.float32), rows))


def _pick(x: jax.Array, onehot: jax.Array) -> jax.Array:
    """Σ onehot · x over chunks and rows: the selected row(s) without gathering sharded data."""
    return jnp.einsum("...cn,cnd->...d", onehot, x, precision=_HIGHEST)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_plusplus(key: jax.Array, x: jax.Array, w: jax.Array, num_clusters: int) -> jax.Array:
    """k-means++ (Arthur & Vassilvitskii): each centre drawn ∝ weight × squared distance to the chosen ones."""
    c, n, d = x.shape
    x = x.astype(jnp.float32)

    def body(i, carry):
        centres, min_dist = carry
        score = jnp.where(i == 0, w, w * min_dist)
        logits = jnp.where(score > 0, jnp.log(jnp.where(score > 0, score, 1.0)), -jnp.inf).reshape(-1)
        idx = jax.random.categorical(jax.random.fold_in(key, i), logits)
        centre = _pick(x, (jnp.arange(c * n) == idx).reshape(c, n).astype(jnp.float32))
        dist = jnp.sum(jnp.square(x - centre), -1)
        min_dist = jnp.where(i == 0, dist, jnp.minimum(min_dist, dist))
        return centres.at[i].set(centre), min_dist

    init = (jnp.zeros((num_clusters, d), jnp.float32), jnp.ones((c, n), jnp.float32))
    return jax.lax.fori_loop(0, num_clusters, body, init)[0]


class Stats(NamedTuple):
    counts: jax.Array  # [K] weighted assignment counts
    sums: jax.Array  # [K, D] weighted sums of assigned rows
    inertia: jax.Array  # Σ w · min distance² (scikit-learn's inertia)
    far_dist: jax.Array  # [K] the K largest weighted distances² seen, descending
    far_points: jax.Array  # [K, D] their rows: where empty clusters are re-seeded


def _chunk_stats(xc: jax.Array, wc: jax.Array, centroids: jax.Array) -> Stats:
    k = centroids.shape[0]
    d2 = squared_distances(xc, centroids)
    codes = jnp.argmin(d2, -1)
    mind = jnp.min(d2, -1) * wc
    onehot = jax.nn.one_hot(codes, k, dtype=jnp.float32) * wc[:, None]
    far, idx = jax.lax.top_k(mind, min(k, xc.shape[0]))
    sel = (idx[:, None] == jnp.arange(xc.shape[0])[None]).astype(jnp.float32)
    points = jnp.einsum("kn,nd->kd", sel, xc, precision=_HIGHEST)
    if far.shape[0] < k:
        far = jnp.pad(far, (0, k - far.shape[0]), constant_values=-1.0)
        points = jnp.pad(points, ((0, k - points.shape[0]), (0, 0)))
    return Stats(onehot.sum(0), jnp.einsum("nk,nd->kd", onehot, xc, precision=_HIGHEST), mind.sum(), far, points)


def _merge(a: Stats, b: Stats) -> Stats:
    far = jnp.concatenate([a.far_dist, b.far_dist])
    points = jnp.concatenate([a.far_points, b.far_points])
    top, idx = jax.lax.top_k(far, a.far_dist.shape[0])
    return Stats(a.counts + b.counts, a.sums + b.sums, a.inertia + b.inertia, top, points[idx])


def empty_stats(num_clusters: int, dim: int) -> Stats:
    """What `accumulate` starts a pass from."""
    k, d = num_clusters, dim
    return Stats(jnp.zeros(k), jnp.zeros((k, d)), jnp.zeros(()), jnp.full((k,), -1.0), jnp.zeros((k, d)))


@jax.jit
def accumulate(stats: Stats, x: jax.Array, w: jax.Array, centroids: jax.Array) -> Stats:
    """`stats` plus one chunk's (x [N, D], w [N]): exact sums and counts, so a pass streamed chunk by chunk
    gives what `lloyd_stats` gives over all the chunks at once."""
    return _merge(stats, _chunk_stats(x.astype(jnp.float32), w, centroids))


@jax.jit
def lloyd_stats(x: jax.Array, w: jax.Array, centroids: jax.Array) -> Stats:
    """Assignment statistics of all chunks (a `lax.scan`, so memory holds one chunk's [N, K] distances)."""
    x = x.astype(jnp.float32)
    zero = empty_stats(*centroids.shape)
    return jax.lax.scan(lambda s, xw: (_merge(s, _chunk_stats(xw[0], xw[1], centroids)), None), zero, (x, w))[0]


def reseed(centroids: jax.Array, counts: jax.Array, far_points: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(centroids with the i-th empty cluster moved to the i-th worst-fitted point, number re-seeded)."""
    empty = counts <= 0
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0, far_points.shape[0] - 1)
    return jnp.where(empty[:, None], far_points[rank], centroids), empty.sum()


@jax.jit
def lloyd_update(centroids: jax.Array, s: Stats) -> jax.Array:
    """The centroids after a Lloyd iteration whose pass gathered `s`: the means, empty clusters re-seeded."""
    means = s.sums / jnp.maximum(s.counts, 1e-12)[:, None]
    return reseed(jnp.where(s.counts[:, None] > 0, means, centroids), s.counts, s.far_points)[0]


@jax.jit
def lloyd_step(x: jax.Array, w: jax.Array, centroids: jax.Array) -> tuple[jax.Array, Stats]:
    """One full Lloyd iteration: (new centroids, statistics of the old ones — their inertia)."""
    s = lloyd_stats(x, w, centroids)
    return lloyd_update(centroids, s), s


@jax.jit
def minibatch_update(centroids: jax.Array, totals: jax.Array, x: jax.Array, w: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One mini-batch k-means update (Sculley 2010) from a chunk x [N, D]: centre ← centre + (n_b/n_total)·
    (batch mean − centre). Returns (centroids, running counts, the chunk's inertia)."""
    s = _chunk_stats(x.astype(jnp.float32), w, centroids)
    totals = totals + s.counts
    means = s.sums / jnp.maximum(s.counts, 1e-12)[:, None]
    rate = (s.counts / jnp.maximum(totals, 1e-12))[:, None]
    c = jnp.where(s.counts[:, None] > 0, centroids + rate * (means - centroids), centroids)
    return reseed(c, totals, s.far_points)[0], totals, s.inertia


@jax.jit
def minibatch_step(x: jax.Array, w: jax.Array, centroids: jax.Array, totals: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One pass of mini-batch k-means, a chunk per update. Returns (centroids, running counts, Σ inertia
    seen during the pass)."""
    def body(carry, xw):
        c, totals, inertia = carry
        c, totals, chunk_inertia = minibatch_update(c, totals, xw[0], xw[1])
        return (c, totals, inertia + chunk_inertia), None

    return jax.lax.scan(body, (centroids, totals, jnp.zeros(())), (x, w))[0]


Chunks = Callable[[], Iterable[tuple[jax.Array, jax.Array]]]  # a fresh pass of (x [N, D], w [N]) chunks


def init_from_sample(chunks: Chunks, num_clusters: int, key: jax.Array, max_chunks: int) -> jax.Array:
    """k-means++ on a bounded sample: the first `max_chunks` chunks of a pass (0 = all of it)."""
    sample = list(itertools.islice(chunks(), max_chunks or None))
    return kmeans_plusplus(key, jnp.stack([x for x, _ in sample]), jnp.stack([w for _, w in sample]), num_clusters)


def stream_pass(chunks: Chunks, centroids: jax.Array, mode: str, totals: jax.Array
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One iteration streamed over a pass, one chunk in memory at a time: full Lloyd (exact sums and counts
    over the pass, then the update) or mini-batch (an update per chunk). Returns (centroids, counts — the
    pass's for full, the running ones for mini-batch —, inertia seen during the pass)."""
    if mode == "minibatch":
        inertia = jnp.zeros(())
        for x, w in chunks():
            centroids, totals, chunk_inertia = minibatch_update(centroids, totals, x, w)
            inertia = inertia + chunk_inertia
        return centroids, totals, inertia
    s = pass_stats(chunks, centroids)
    return lloyd_update(centroids, s), s.counts, s.inertia


def pass_stats(chunks: Chunks, centroids: jax.Array) -> Stats:
    """`lloyd_stats` of a streamed pass."""
    s = empty_stats(*centroids.shape)
    for x, w in chunks():
        s = accumulate(s, x, w, centroids)
    return s


@functools.partial(jax.jit, static_argnames=("num_clusters", "iters"))
def kmeans(x: jax.Array, num_clusters: int, key: jax.Array, iters: int = 20) -> jax.Array:
    """Centres [K, D] of the rows of x [N, D] (each of weight 1): k-means++, then `iters` Lloyd steps.

    One traced program, so it runs inside a jitted step; with a batch-sharded `x` every device contributes.
    """
    x = jnp.asarray(x, jnp.float32)[None]
    w = jnp.ones(x.shape[:2], jnp.float32)
    return jax.lax.fori_loop(0, iters, lambda _, c: lloyd_step(x, w, c)[0], kmeans_plusplus(key, x, w, num_clusters))


class KMeansResult(NamedTuple):
    centroids: jax.Array  # [K, D]
    inertia: float  # of the returned centroids
    history: list[float]  # inertia at each iteration of the best run


def fit_kmeans(x: jax.Array, w: jax.Array, num_clusters: int, key: jax.Array, **kwargs) -> KMeansResult:
    """k-means of chunks x [C, N, D] (weights w [C, N]) in memory: `fit_kmeans_stream` over its chunks,
    seeded from all of them."""
    return fit_kmeans_stream(lambda: zip(x, w), num_clusters, key, **kwargs)


def fit_kmeans_stream(chunks: Chunks, num_clusters: int, key: jax.Array, *, iters: int = 50, n_init: int = 1,
                      mode: str = "full", tol: float = 0.0, init_chunks: int = 0, progress: bool = True
                      ) -> KMeansResult:
    """k-means of the chunks `chunks()` yields, streamed (one chunk in memory at a time); the best of `n_init`
    k-means++ seedings, each on the first `init_chunks` chunks (0 = all).

    `tol` > 0 stops when the relative inertia change falls below it. A tqdm bar shows the inertia.
    """
    if mode not in ("full", "minibatch"):
        raise ValueError(f"mode={mode!r} must be 'full' or 'minibatch'")
    best: KMeansResult | None = None
    bar = tqdm(total=n_init * iters, desc="k-means", disable=not progress or jax.process_index() != 0)
    for run_key in jax.random.split(key, n_init):
        centroids = init_from_sample(chunks, num_clusters, run_key, init_chunks)
        totals = jnp.zeros(num_clusters)
        history: list[float] = []
        for _ in range(iters):
            centroids, totals, inertia_sum = stream_pass(chunks, centroids, mode, totals)
            inertia = float(inertia_sum)
            bar.update(1)
            bar.set_postfix(inertia=f"{inertia:.4g}")
            converged = history and abs(history[-1] - inertia) <= tol * max(history[-1], 1e-30)
            history.append(inertia)
            if tol > 0 and converged:
                break
        final = float(pass_stats(chunks, centroids).inertia)
        if best is None or final < best.inertia:
            best = KMeansResult(centroids, final, history)
    bar.close()
    return best
