"""VQ / RVQ: k-means fitting, reconstruction, straight-through gradients, EMA and dead-code updates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from melody_jax.nn.kmeans import assign, kmeans
from melody_jax.nn.quantizers import VQ_COLLECTION, ResidualVectorQuantizer, VectorQuantizer

DIM = 128


def _mixture(n, dim, num_components, seed, spread=4.0):
    """Mixture of isotropic Gaussians: centres ~ N(0, spread²), unit-variance points around them."""
    rng = np.random.default_rng(seed)
    centres = spread * rng.standard_normal((num_components, dim))
    labels = rng.integers(0, num_components, n)
    return (centres[labels] + rng.standard_normal((n, dim))).astype(np.float32), centres.astype(np.float32)


def fit_rvq_kmeans(x: jax.Array, num_quantizers: int, codebook_size: int, key: jax.Array, iters: int) -> jax.Array:
    """RVQ codebooks [Q, K, D] by k-means on each level's residual (what the rvq stage fits, §4.3)."""
    residual, codebooks = jnp.asarray(x, jnp.float32), []
    for level_key in jax.random.split(key, num_quantizers):
        codebooks.append(kmeans(residual, codebook_size, level_key, iters))
        residual = residual - codebooks[-1][assign(residual, codebooks[-1])]
    return jnp.stack(codebooks)


@pytest.fixture(scope="module")
def fitted_rvq():
    x, _ = _mixture(2048, DIM, 32, seed=0)
    model = ResidualVectorQuantizer(num_quantizers=4, codebook_size=64, dim=DIM)
    codebooks = fit_rvq_kmeans(jnp.asarray(x), 4, 64, jax.random.key(0), iters=10)
    variables = model.init({"params": jax.random.key(1)}, codebooks, method=model.set_codebooks)
    return model, variables, codebooks, jnp.asarray(x)


def test_kmeans_finds_separated_clusters():
    x, centres = _mixture(1024, 16, 8, seed=1, spread=10.0)
    found = np.asarray(kmeans(jnp.asarray(x), 8, jax.random.key(2), iters=10))
    gap = np.sqrt(((centres[:, None] - found[None]) ** 2).sum(-1)).min(1)
    # With ~128 unit-variance points per cluster in 16-d the mean is off by ~sqrt(16/128) ≈ 0.35.
    assert gap.max() < 1.0, f"true centre → nearest found centre distances {gap}"


def test_rvq_error_falls_with_every_level(fitted_rvq):
    model, variables, codebooks, x = fitted_rvq
    assert codebooks.shape == (4, 64, DIM)
    stored = model.apply(variables, method=model.codebooks)
    np.testing.assert_array_equal(np.asarray(stored), np.asarray(codebooks))
    errors, cosines = [], []
    for n_q in range(1, 5):
        q = model.apply(variables, x, n_q).quantized
        errors.append(float(jnp.mean((q - x) ** 2)))
        cos = jnp.sum(q * x, -1) / (jnp.linalg.norm(q, axis=-1) * jnp.linalg.norm(x, axis=-1))
        cosines.append(float(jnp.mean(cos)))
    assert all(b < 0.97 * a for a, b in zip(errors, errors[1:])), f"MSE per n_q = {errors}"
    # Data variance is 16 + 1 per dim; one level already captures the 32 centres (MSE ~ 1).
    assert errors[-1] < 1.0, f"4-level MSE {errors[-1]:.3f} >= 1.0 (data variance ≈ 17)"
    assert cosines[-1] > 0.97, f"mean cosine(x, x̂) at 4 levels = {cosines[-1]:.4f} <= 0.97"


def test_encode_decode_round_trip(fitted_rvq):
    model, variables, _, x = fitted_rvq
    codes = model.apply(variables, x, method=model.encode)
    assert codes.shape == (x.shape[0], 4) and codes.dtype == jnp.int32
    decoded = model.apply(variables, codes, method=model.decode)
    np.testing.assert_allclose(np.asarray(decoded), np.asarray(model.apply(variables, x).quantized), atol=1e-5)
    two = model.apply(variables, x, 2)
    np.testing.assert_array_equal(np.asarray(two.codes), np.asarray(codes[:, :2]))
    np.testing.assert_allclose(
        np.asarray(model.apply(variables, codes[:, :2], method=model.decode)), np.asarray(two.quantized), atol=1e-5
    )
    # A single VQ: decoding then encoding gives the codes back (distinct codebook rows).
    vq = VectorQuantizer(codebook_size=64, dim=DIM)
    vq_vars = {VQ_COLLECTION: variables[VQ_COLLECTION]["levels_0"]}
    some = jnp.arange(64, dtype=jnp.int32)[::-1].reshape(8, 8)
    np.testing.assert_array_equal(
        np.asarray(vq.apply(vq_vars, vq.apply(vq_vars, some, method=vq.decode), method=vq.encode)), np.asarray(some)
    )
    # Feeding the codebook itself uses every code exactly once.
    out = vq.apply(vq_vars, vq.apply(vq_vars, jnp.arange(64), method=vq.decode))
    np.testing.assert_allclose(float(out.perplexity), 64.0, rtol=1e-5)
    assert float(out.usage) == 1.0


def test_straight_through_gradient(fitted_rvq):
    model, variables, _, x = fitted_rvq
    x = x[:64].reshape(4, 16, DIM)
    grad = jax.grad(lambda y: model.apply(variables, y).quantized.sum())(x)
    np.testing.assert_array_equal(np.asarray(grad), 1.0)

    def updated_sum(y):
        out, _ = model.apply(variables, y, update=True, rngs={"vq": jax.random.key(0)}, mutable=[VQ_COLLECTION])
        return out.quantized.sum()

    np.testing.assert_array_equal(np.asarray(jax.grad(updated_sum)(x)), 1.0)
    # The commitment loss pulls the input toward its (fixed) code: gradient 2(x − q)/size.
    out = model.apply(variables, x, 1)
    commit_grad = jax.grad(lambda y: model.apply(variables, y, 1).commitment_loss)(x)
    np.testing.assert_allclose(np.asarray(commit_grad), np.asarray(2 * (x - out.quantized) / x.size), atol=1e-7)


def _vq_with_codebook(codebook, **kwargs):
    vq = VectorQuantizer(codebook_size=codebook.shape[0], dim=codebook.shape[1], kmeans_init=False, **kwargs)
    return vq, vq.init({"params": jax.random.key(0)}, jnp.asarray(codebook), method=vq.set_codebook)


def _update(vq, variables, x, seed=0):
    rngs = {"vq": jax.random.key(seed)}
    return vq.apply(variables, jnp.asarray(x), update=True, rngs=rngs, mutable=[VQ_COLLECTION])


def test_ema_update_moves_codes_toward_assigned_inputs():
    decay, eps = 0.9, 1e-5
    codebook = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal([1.0, 1.0], 0.1, (40, 2)), rng.normal([9.0, -1.0], 0.1, (60, 2))])
    x = x.astype(np.float32)
    vq, variables = _vq_with_codebook(codebook, decay=decay, epsilon=eps, dead_code_threshold=0.0)
    out, new = _update(vq, variables, x)
    np.testing.assert_array_equal(np.asarray(out.codes), [0] * 40 + [1] * 60)
    stats = new[VQ_COLLECTION]
    # Hand-computed EMA with Laplace smoothing from fitted sizes max(threshold, 1) = 1; code 2 only decays.
    counts = np.array([40.0, 60.0, 0.0])
    sums = np.stack([x[:40].sum(0), x[40:].sum(0), np.zeros(2)])
    size = decay * 1.0 + (1 - decay) * counts
    embed = decay * codebook + (1 - decay) * sums
    smoothed = (size + eps) / (size.sum() + 3 * eps) * size.sum()
    np.testing.assert_allclose(np.asarray(stats["cluster_size"].value), size, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["codebook"].value), embed / smoothed[:, None], rtol=1e-5, atol=1e-6)
    before = np.linalg.norm(codebook[:2] - [x[:40].mean(0), x[40:].mean(0)], axis=-1)
    after = np.linalg.norm(np.asarray(stats["codebook"].value)[:2] - [x[:40].mean(0), x[40:].mean(0)], axis=-1)
    # The code moves to (0.9·c + 0.1·n·mean) / (0.9 + 0.1·n): its gap shrinks by 0.9 / (0.9 + 0.1·n).
    np.testing.assert_allclose(after / before, [0.9 / 4.9, 0.9 / 6.9], rtol=1e-3)
    assert int(out.dead_codes) == 0


def test_dead_codes_are_reseeded_from_current_inputs():
    codebook = np.array([[0.0, 0.0], [5.0, 5.0], [100.0, 100.0]], np.float32)
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0.0, 0.5, (50, 2)), rng.normal(5.0, 0.5, (50, 2))]).astype(np.float32)
    vq, variables = _vq_with_codebook(codebook, decay=0.5, dead_code_threshold=2.0)
    out, new = _update(vq, variables, x)
    stats = new[VQ_COLLECTION]
    reseeded = np.asarray(stats["codebook"].value)[2]
    assert int(out.dead_codes) == 1
    assert np.abs(x - reseeded).sum(-1).min() == 0.0, f"re-seeded code {reseeded} is not one of the inputs"
    # Fitted codes start at size max(threshold, 1) = 2: 0.5·2 + 0.5·50 = 26; code 2 decays to 1 < 2.
    np.testing.assert_allclose(np.asarray(stats["cluster_size"].value), [26.0, 26.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(stats["embed_sum"].value)[2], 2.0 * reseeded, rtol=1e-6)


def test_kmeans_init_from_first_batch_and_axis_names():
    x, _ = _mixture(512, 16, 8, seed=2, spread=6.0)
    x = jnp.asarray(x + 20.0)  # far from the N(0, 1) initial codebook
    vq = VectorQuantizer(codebook_size=8, dim=16, kmeans_iters=10)
    variables = vq.init({"params": jax.random.key(0)}, x)
    assert nn.get_partition_spec(variables)[VQ_COLLECTION]["codebook"] == P("vocab", "embed")
    assert not bool(variables[VQ_COLLECTION]["initialized"])
    before = float(vq.apply(variables, x).commitment_loss)
    out, new = jax.jit(lambda v, y: _update(vq, v, y))(variables, x)
    assert bool(new[VQ_COLLECTION]["initialized"])
    after = float(vq.apply(new, x).commitment_loss)
    assert after < 0.01 * before, f"commitment loss {before:.1f} → {after:.3f} after k-means init"
    assert after < 1.5, f"8 codes for 8 unit-variance clusters in 16-d: loss {after:.3f} per dim should be ≈ 1"
    assert float(out.perplexity) > 6.0 and int(out.dead_codes) == 0
    # bf16 inputs come back as bf16.
    assert vq.apply(new, x.astype(jnp.bfloat16)).quantized.dtype == jnp.bfloat16
