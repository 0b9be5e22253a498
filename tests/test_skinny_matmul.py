"""The CPU decode kernels (melody_jax/nn/skinny.py): XLA's products and cached attention to float32 rounding,
and where they run.

Shapes are odd on purpose: K not a multiple of the kernel's 8-row passes, N not a multiple of its
16-lane vectors or 1024-column panels, K long enough to be split between threads; a head size that is
not a multiple of 16 lanes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.nn import skinny
from melody_jax.nn.attention import cached_attention
from melody_jax.nn.init import dense
from melody_jax.pipelines.musicgen_sampling import generate
from tests.test_hf_musicgen import converted


def _relative(got, want) -> float:
    return float(np.abs(np.asarray(got) - np.asarray(want)).max() / np.abs(np.asarray(want)).max())


@pytest.fixture(scope="module", autouse=True)
def built():
    assert skinny.available()  # the test machines have a C++ compiler


@pytest.mark.parametrize("k, n", [(37, 83), (300, 1030)])
def test_kernel_is_xla_dot_for_one_to_eight_rows(k, n):
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal((m, k)), jnp.float32) for m in range(1, skinny.MAX_ROWS + 1)]
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    got = jax.jit(lambda xs, w: [skinny.matmul(x, w) for x in xs])(xs, w)
    for x, y in zip(xs, got):
        assert y.shape == (x.shape[0], n)
        assert _relative(y, jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)) < 1e-5


@pytest.mark.parametrize("length", [1, 7, 10])
def test_cache_attention_is_the_masked_attention_and_reads_only_the_filled_cache(length):
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.standard_normal((2, 1, 3, 20)), jnp.float32)
    k, v = (rng.standard_normal((2, 3, 10, 20)).astype(np.float32) for _ in range(2))
    filled = np.arange(10) < length
    mask = jnp.asarray(filled)[None, None, None]
    want = cached_attention(q, jnp.asarray(k), jnp.asarray(v), mask, 0.3)
    k[:, :, ~filled], v[:, :, ~filled] = np.nan, np.nan  # never read
    got = jax.jit(lambda q, k, v, n: skinny.cache_attention(q, k, v, n, 0.3, None))(q, k, v, jnp.int32(length))
    assert got.shape == want.shape and _relative(got, want) < 1e-5


def _dense_pair(features, names, axis, x):
    """(routed, plain) outputs of one Dense and the routed program's text."""
    layer = dense(features, names, axis=axis, use_bias=True)
    params = layer.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # a bias that is not zero

    def routed(params, x):
        with skinny.routing():
            return layer.apply(params, x)

    text = jax.jit(routed).lower(params, x).as_text()
    return jax.jit(routed)(params, x), layer.apply(params, x), text


@pytest.mark.parametrize("features, names, axis, shape", [
    ((3, 5), ("embed", "heads", "kv"), -1, (2, 1, 19)),           # a [K, H, D] projection
    (11, ("heads", "kv", "embed"), (-2, -1), (3, 1, 3, 5)),         # the [H, D, K] output projection
])
def test_dense_routes_multi_axis_kernels(features, names, axis, shape):
    x = jnp.asarray(np.random.default_rng(1).standard_normal(shape), jnp.float32)
    routed, plain, text = _dense_pair(features, names, axis, x)
    assert skinny.TARGET in text
    assert routed.shape == plain.shape and _relative(routed, plain) < 1e-5


def test_not_routed_beyond_eight_rows_in_bf16_or_under_a_mesh():
    x = jnp.ones((2, 1, 16), jnp.float32)
    assert skinny.TARGET not in _dense_pair(4, ("embed", "mlp"), -1, jnp.ones((9, 16)))[2]
    assert skinny.TARGET not in _dense_pair(4, ("embed", "mlp"), -1, x.astype(jnp.bfloat16))[2]
    with jax.set_mesh(jax.make_mesh((8,), ("data",))):  # a sharded program keeps XLA's dot
        assert skinny.TARGET not in _dense_pair(4, ("embed", "mlp"), -1, x)[2]
    with skinny.routing():
        assert not skinny.applies(x, jnp.ones((16, 4)), (1,), jnp.float32)  # contracts a middle axis


@pytest.fixture
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_greedy_decode_with_the_kernel_is_the_decode_without(highest_precision, monkeypatch):
    model, params, pattern, golden, ids, mask = converted("musicgen")
    frames = golden["greedy_codes"].shape[2]

    def codes():
        jax.clear_caches()  # the routing is read when the decode is traced
        return np.asarray(generate(model, params, pattern, ids, mask, frames, jax.random.key(0),
                                   cfg_scale=3.0, temperature=0.0).codes)

    calls = []
    for name in ("contract", "cache_attention"):
        traced = getattr(skinny, name)
        monkeypatch.setattr(skinny, name, lambda *a, traced=traced, name=name: calls.append(name) or traced(*a))
    with_kernel = codes()
    # a decoder layer's projections, FFN and the heads, and its self-attention, traced through the kernels
    assert calls.count("contract") >= 4 and calls.count("cache_attention") >= 1
    monkeypatch.setattr(skinny, "available", lambda: False)
    without = codes()
    jax.clear_caches()
    np.testing.assert_array_equal(with_kernel, without)
    np.testing.assert_array_equal(with_kernel, golden["greedy_codes"])


def test_without_a_compiler_one_line_says_so_and_xla_is_used(monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler")
    assert not skinny.available.__wrapped__()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: no C++ compiler") and "XLA's ops are used" in err[0]
