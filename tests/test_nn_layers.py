"""Shared layers against plain NumPy references on random inputs (max abs error in each message)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from melody_jax.models.transformer import DecoderLM
from melody_jax.nn.attention import Attention, padding_mask
from melody_jax.nn.film import FiLM
from melody_jax.nn.mlp import GeluMLP, SwiGLU
from melody_jax.nn.norms import RMSNorm
from melody_jax.nn.rotary import apply_rotary

TOL = 2e-5


def _init(module, *args, **kw):
    variables = module.init(jax.random.key(0), *args, **kw)
    return variables, nn.meta.unbox(variables["params"])


def _check(got, want, tol=TOL):
    err = float(np.max(np.abs(np.asarray(got, np.float64) - want)))
    assert err < tol, f"max abs error {err:.3g} >= {tol}"


def np_rms(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * scale


def np_rotary(x, pos, base=10000.0):
    d = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, d, 2) / d)
    ang = pos[:, None] * inv  # [T, D/2]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def np_attention(x, ctx, p, heads, mask=None, rotary=True):
    q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"])
    k = np.einsum("btd,dhk->bthk", ctx, p["key"]["kernel"])
    v = np.einsum("btd,dhk->bthk", ctx, p["value"]["kernel"])
    if rotary:
        q, k = np_rotary(q, np.arange(q.shape[1])), np_rotary(k, np.arange(k.shape[1]))
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        logits = np.where(mask, logits, -1e30)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshk->bthk", w, v)
    return np.einsum("bthk,hkd->btd", out, p["out"]["kernel"])


def test_rmsnorm_matches_numpy():
    x = np.random.RandomState(0).randn(3, 5, 16).astype(np.float32)
    variables, p = _init(RMSNorm(), x)
    p = jax.tree.map(lambda a: a + np.random.RandomState(1).randn(*a.shape).astype(np.float32) * 0.1, p)
    _check(RMSNorm().apply({"params": p}, x), np_rms(x.astype(np.float64), np.asarray(p["scale"])))


def test_rotary_matches_numpy_and_preserves_norm():
    x = np.random.RandomState(0).randn(2, 7, 3, 8).astype(np.float32)
    got = apply_rotary(jnp.asarray(x), jnp.arange(7))
    _check(got, np_rotary(x.astype(np.float64), np.arange(7)))
    _check(jnp.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), 1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_matches_numpy(causal):
    rs = np.random.RandomState(0)
    x = rs.randn(2, 6, 16).astype(np.float32)
    valid = np.ones((2, 6), bool)
    valid[1, 4:] = False
    att = Attention(num_heads=4)
    _, p = _init(att, x)
    got = att.apply({"params": p}, x, mask=padding_mask(jnp.asarray(valid)), causal=causal)
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & np.tril(np.ones((6, 6), bool))[None, None]
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    _check(got, np_attention(x.astype(np.float64), x.astype(np.float64), pn, 4, mask))


def test_cross_attention_matches_numpy_without_rotary():
    rs = np.random.RandomState(1)
    x, ctx = rs.randn(2, 5, 16).astype(np.float32), rs.randn(2, 9, 12).astype(np.float32)
    att = Attention(num_heads=2)
    _, p = _init(att, x, ctx)
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    _check(att.apply({"params": p}, x, ctx), np_attention(x.astype(np.float64), ctx.astype(np.float64), pn, 2,
                                                         rotary=False))


def test_attention_rejects_bad_head_count():
    with pytest.raises(ValueError, match="num_heads=7 does not divide embed_dim=16"):
        Attention(num_heads=7).init(jax.random.key(0), jnp.ones((1, 3, 16)))


def test_swiglu_gelu_film_match_numpy():
    rs = np.random.RandomState(2)
    x = rs.randn(2, 4, 8).astype(np.float32)
    _, p = _init(SwiGLU(32), x)
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x64 = x.astype(np.float64)
    g, u = x64 @ pn["gate"]["kernel"], x64 @ pn["up"]["kernel"]
    _check(SwiGLU(32).apply({"params": p}, x), (g / (1 + np.exp(-g)) * u) @ pn["down"]["kernel"])

    _, p = _init(GeluMLP(32, out_dim=5), x)
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    import scipy.special
    h = x64 @ pn["fc1"]["kernel"] + pn["fc1"]["bias"]
    h = 0.5 * h * (1 + scipy.special.erf(h / np.sqrt(2)))
    _check(GeluMLP(32, out_dim=5).apply({"params": p}, x), h @ pn["fc2"]["kernel"] + pn["fc2"]["bias"])

    m = rs.randn(2, 1, 6).astype(np.float32)
    _, p = _init(FiLM(), x, m)
    p = jax.tree.map(lambda a: a + rs.randn(*a.shape).astype(np.float32) * 0.1, p)
    pn = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    gb = m.astype(np.float64) @ pn["proj"]["kernel"] + pn["proj"]["bias"]
    _check(FiLM().apply({"params": p}, x, m), (1 + gb[..., :8]) * x64 + gb[..., 8:])


def test_every_param_has_logical_names():
    model = DecoderLM(vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, mlp_dim=32)
    params = model.init(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nn.Partitioned))
    assert leaves and all(isinstance(a, nn.Partitioned) for a in leaves)
    for leaf in leaves:
        assert len(leaf.names) == leaf.value.ndim


def test_kv_cache_decoding_equals_full_forward():
    """Prefill 5 tokens, then decode one at a time: logits equal the no-cache forward at every position."""
    model = DecoderLM(vocab_size=32, num_layers=2, embed_dim=32, num_heads=4, mlp_dim=64)
    tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 32)
    params = model.init(jax.random.key(0), tokens)["params"]
    full = model.apply({"params": params}, tokens)

    dec = model.clone(decode=True)
    cache = dec.init(jax.random.key(0), jnp.zeros_like(tokens))["cache"]
    logits, upd = dec.apply({"params": params, "cache": cache}, tokens[:, :5], mutable=["cache"])
    steps = [logits]
    cache = upd["cache"]
    for t in range(5, 12):
        logits, upd = dec.apply({"params": params, "cache": cache}, tokens[:, t:t + 1], mutable=["cache"])
        cache = upd["cache"]
        steps.append(logits)
    _check(jnp.concatenate(steps, axis=1), np.asarray(full, np.float64), 1e-4)
