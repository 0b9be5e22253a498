"""SRU: the associative-scan recurrence equals the sequential reference, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from melody_jax.nn.sru import SRU, BiSRU, linear_recurrence

RTOL, ATOL = 1e-5, 1e-5  # float32, recurrences of up to 33 steps


def numpy_recurrence(a, b):
    c, out = np.zeros_like(b[..., 0, :]), []
    for t in range(b.shape[-2]):
        c = a[..., t, :] * c + b[..., t, :]
        out.append(c)
    return np.stack(out, axis=-2)


@pytest.mark.parametrize("length", [1, 7, 33])
def test_linear_recurrence_both_ways_match_a_loop(length):
    ka, kb = jax.random.split(jax.random.key(length))
    a = jax.random.uniform(ka, (2, 3, length, 5))
    b = jax.random.normal(kb, (2, 3, length, 5))
    expected = numpy_recurrence(np.asarray(a, np.float64), np.asarray(b, np.float64))
    for parallel in (True, False):
        out = jax.jit(linear_recurrence, static_argnums=2)(a, b, parallel)
        np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


def test_sru_equations():
    x = jax.random.normal(jax.random.key(0), (2, 5, 4))
    params = SRU().init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, nn.unbox(params))  # non-zero biases too
    out = SRU().apply(params, x)
    kernel, bias = params["params"]["proj"]["kernel"], params["params"]["proj"]["bias"]
    proj = np.einsum("btd,dke->btke", np.asarray(x), np.asarray(kernel)) + np.asarray(bias)
    x_tilde, f, r = proj[..., 0, :], 1 / (1 + np.exp(-proj[..., 1, :])), 1 / (1 + np.exp(-proj[..., 2, :]))
    c = numpy_recurrence(f, (1 - f) * x_tilde)
    np.testing.assert_allclose(out, r * c + (1 - r) * np.asarray(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("length", [3, 17])
def test_bisru_parallel_equals_sequential_forward_and_gradient(length):
    x = jax.random.normal(jax.random.key(2), (2, 3, length, 8))
    variables = BiSRU().init(jax.random.key(3), x)

    def loss(variables, x, parallel):
        return jnp.sum(jnp.sin(BiSRU(parallel=parallel).apply(variables, x)))

    outs = {p: jax.jit(BiSRU(parallel=p).apply)(variables, x) for p in (True, False)}
    assert outs[True].shape == x.shape
    np.testing.assert_allclose(outs[True], outs[False], rtol=RTOL, atol=ATOL)
    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads = {p: grad_fn(variables, x, p) for p in (True, False)}
    for g_par, g_seq in zip(jax.tree.leaves(grads[True]), jax.tree.leaves(grads[False])):
        np.testing.assert_allclose(g_par, g_seq, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(grads[True][1]).max()) > 0


def test_bisru_sees_both_directions():
    x = jax.random.normal(jax.random.key(4), (1, 9, 4))
    variables = BiSRU().init(jax.random.key(5), x)
    # Perturbing the last frame changes the first output (backward), the first changes the last.
    apply = jax.jit(BiSRU().apply)
    y = apply(variables, x)
    y_last = apply(variables, x.at[:, -1].add(1.0))
    y_first = apply(variables, x.at[:, 0].add(1.0))
    assert float(jnp.abs(y_last[:, 0] - y[:, 0]).max()) > 1e-4
    assert float(jnp.abs(y_first[:, -1] - y[:, -1]).max()) > 1e-4


def test_bisru_params_logical_axes_and_count():
    dim = 6
    x = jnp.zeros((1, 4, dim))
    boxed = jax.eval_shape(BiSRU().init, jax.random.key(0), x)["params"]
    specs = nn.get_partition_spec(boxed)
    assert specs["forward"]["proj"]["kernel"] == jax.sharding.PartitionSpec("embed", None, "mlp")
    assert specs["out"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert all(isinstance(v, nn.Partitioned) for v in leaves)
    count = sum(np.prod(v.value.shape) for v in leaves)
    assert count == 2 * (3 * dim**2 + 3 * dim) + 2 * dim**2 + dim


def test_bfloat16_compute_keeps_float32_params():
    x = jax.random.normal(jax.random.key(6), (2, 11, 8))
    variables = BiSRU(dtype=jnp.bfloat16).init(jax.random.key(7), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    y16 = jax.jit(BiSRU(dtype=jnp.bfloat16).apply)(variables, x)
    y32 = jax.jit(BiSRU().apply)(variables, x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=0.05, atol=0.05)
