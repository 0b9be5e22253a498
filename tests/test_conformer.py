"""wav2vec2-Conformer (DESIGN §4.2): block and rotary attention against NumPy, masking, negatives,
quantizer, loss, sharded forward on 8 CPU devices, frame rate and parameter counts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.ssl import get_config
from melody_jax.models.conformer import ConformerBlock, GumbelQuantizer, span_mask
from melody_jax.models.ssl_loss import contrastive_logits, sample_negatives, wav2vec2_loss
from melody_jax.nn.attention import Attention
from melody_jax.tasks.ssl import SSLTask, gumbel_temperature
from melody_jax.frozen.semantic import tokenize
from melody_jax.training.sharding import DEFAULT_RULES, activate, make_mesh
from tests.helpers import stage_config


# --- NumPy reference -------------------------------------------------------------------------
def np_ln(x, p):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def np_silu(x):
    return x / (1 + np.exp(-x))


def np_rotary(x, pos):  # x [B, T, H, D]; pairs (i, i + D/2)
    half = x.shape[-1] // 2
    inv = 1.0 / 10000.0 ** (np.arange(0, x.shape[-1], 2) / x.shape[-1])
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def np_attention(x, p):
    proj = lambda n: np.einsum("btd,dhk->bthk", x, p[n]["kernel"]) + p[n]["bias"]  # noqa: E731
    pos = np.arange(x.shape[1], dtype=np.float64)
    q, k, v = np_rotary(proj("query"), pos), np_rotary(proj("key"), pos), proj("value")
    s = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshk->bthk", a, v)
    return np.einsum("bthk,hkd->btd", o, p["out"]["kernel"]) + p["out"]["bias"]


def np_ffn(x, p):
    h = np_silu(np_ln(x, p["norm"]) @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    return h @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def np_conv_module(x, p):
    h = np.einsum("btd,dce->btce", np_ln(x, p["norm"]), p["pointwise_in"]["kernel"]) + p["pointwise_in"]["bias"]
    h = h[..., 0, :] / (1 + np.exp(-h[..., 1, :]))
    w = p["depthwise"][:, 0, :]  # [k, D]
    k, t = w.shape[0], h.shape[1]
    hp = np.pad(h, ((0, 0), ((k - 1) // 2, k - 1 - (k - 1) // 2), (0, 0)))
    h = sum(hp[:, j:j + t] * w[j] for j in range(k)) + p["depthwise_bias"]
    h = np_silu(np_ln(h, p["depthwise_norm"]))
    return h @ p["pointwise_out"]["kernel"] + p["pointwise_out"]["bias"]


def np_block(x, p):
    x = x + 0.5 * np_ffn(x, p["ffn_in"])
    x = x + np_attention(np_ln(x, p["attn_norm"]), p["attn"])
    x = x + np_conv_module(x, p["conv"])
    x = x + 0.5 * np_ffn(x, p["ffn_out"])
    return np_ln(x, p["final_norm"])


def as_numpy(params):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(params))


def test_rotary_attention_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 11, 32))
    attn = Attention(4, use_bias=True)
    params = attn.init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(jax.random.key(2), a.shape), nn.meta.unbox(params))
    got = np.asarray(attn.apply({"params": params}, x))
    want = np_attention(np.asarray(x, np.float64), as_numpy(params))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Rotary makes scores depend on relative offsets only: shifting all positions changes nothing.
    shifted = np.asarray(attn.apply({"params": params}, x, positions=jnp.arange(11) + 37))
    np.testing.assert_allclose(shifted, got, rtol=1e-4, atol=1e-4)


def test_conformer_block_matches_numpy():
    x = jax.random.normal(jax.random.key(0), (2, 13, 32))
    block = ConformerBlock(num_heads=4, mlp_dim=48, conv_kernel=5)
    params = nn.meta.unbox(block.init(jax.random.key(1), x)["params"])
    keys = iter(jax.random.split(jax.random.key(3), 64))  # perturb norms/biases so none is a no-op
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)
    got = np.asarray(block.apply({"params": params}, x))
    want = np_block(np.asarray(x, np.float64), as_numpy(params))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


# --- masking, negatives, quantizer, loss -----------------------------------------------------
def test_span_mask_statistics():
    p, m = 0.65, 10
    mask = np.asarray(span_mask(jax.random.key(0), (64, 500), p, m))
    # Expected share: 1 − (1 − p/m)^m = 0.49 (fairseq's ~49 % for p = 0.65, M = 10).
    assert abs(mask.mean() - (1 - (1 - p / m) ** m)) < 0.02, mask.mean()
    # Runs of masked frames, leaving out each row's last run (a span may be cut by the row's end).
    runs = [len(r) for row in mask for r in "".join("1" if v else "0" for v in row).split("0")[:-1] if r]
    assert min(runs) >= m  # spans are at least M frames (overlapping spans merge into longer runs)


def test_negatives_are_other_masked_frames_of_the_same_utterance():
    mask = span_mask(jax.random.key(1), (8, 60), 0.65, 4)
    neg = np.asarray(sample_negatives(jax.random.key(2), mask, 20))
    m = np.asarray(mask)
    for b in range(8):
        for t in np.flatnonzero(m[b]):
            assert m[b, neg[b, t]].all() and (neg[b, t] != t).all()
        assert len(set(neg[b][m[b]].ravel())) == m[b].sum()  # every masked frame serves as a distractor


def test_contrastive_logits_against_numpy_and_identical_codes_dropped():
    rng = np.random.default_rng(0)
    c, q = rng.standard_normal((1, 6, 8)), rng.standard_normal((1, 6, 8))
    codes = np.arange(6).reshape(1, 6, 1)
    codes[0, 5] = codes[0, 4]  # frame 5 quantizes like frame 4
    neg = np.array([[[1, 4], [0, 2], [3, 1], [2, 0], [5, 0], [4, 1]]])
    got = np.asarray(contrastive_logits(jnp.asarray(c), jnp.asarray(q), jnp.asarray(codes), jnp.asarray(neg), 0.1))
    cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    for t in range(6):
        assert got[0, t, 0] == pytest.approx(cos(c[0, t], q[0, t]) / 0.1, abs=1e-4)
        for j, s in enumerate(neg[0, t]):
            want = -1e9 if (t, s) in ((4, 5), (5, 4)) else cos(c[0, t], q[0, s]) / 0.1
            assert got[0, t, 1 + j] == pytest.approx(want, abs=1e-4)


def test_a_collapsed_codebook_is_not_counted_as_accuracy():
    """Frames whose distractors all share their codes are left out of accuracy and reported as dropped."""
    rng = np.random.default_rng(1)
    b, t = 2, 12
    out = {"context": jnp.asarray(rng.standard_normal((b, t, 8))),
           "targets": jnp.asarray(rng.standard_normal((b, t, 8))), "mask": jnp.ones((b, t), bool),
           "prob_perplexity": jnp.asarray(4.0), "code_perplexity": jnp.asarray(4.0),
           "feature_penalty": jnp.asarray(0.0)}
    kwargs = dict(num_negatives=5, logit_temperature=0.1, num_codes=8, diversity_weight=0.0, feature_penalty_weight=0.0)
    collapsed = {**out, "codes": jnp.zeros((b, t, 2), jnp.int32)}  # one code pair for every frame
    loss, m = wav2vec2_loss(collapsed, jax.random.key(0), **kwargs)
    assert float(m["distractors_dropped"]) == 1.0 and float(m["accuracy"]) == 0.0 and float(loss) == 0.0
    distinct = {**out, "codes": jnp.stack([jnp.broadcast_to(jnp.arange(t), (b, t))] * 2, -1)}
    loss, m = wav2vec2_loss(distinct, jax.random.key(0), **kwargs)
    assert float(m["distractors_dropped"]) == 0.0 and float(loss) > 0.0


def test_gumbel_quantizer_is_hard_and_perplexity_is_bounded():
    x = jax.random.normal(jax.random.key(0), (4, 50, 16))
    quant = GumbelQuantizer(num_groups=2, num_vars=8, codevector_dim=6)
    params = quant.init({"params": jax.random.key(1), "gumbel": jax.random.key(2)}, x, 2.0, True)["params"]
    for train in (True, False):
        q, codes, soft_ppl, hard_ppl = quant.apply({"params": params}, x, 2.0, train,
                                                   rngs={"gumbel": jax.random.key(3)})
        book = np.asarray(nn.meta.unbox(params)["codevectors"])  # [G, V, 3]
        want = np.concatenate([book[0][np.asarray(codes[..., 0])], book[1][np.asarray(codes[..., 1])]], -1)
        np.testing.assert_allclose(np.asarray(q), want, atol=1e-6)  # forward pass is exactly the chosen codes
        assert 1.0 <= float(hard_ppl) <= 16.0 and 1.0 <= float(soft_ppl) <= 16.0
    logits = nn.meta.unbox(params)["logits"]["kernel"]
    assert float(jnp.std(logits)) == pytest.approx(1.0, abs=0.15)  # fairseq's N(0, 1) projection


def test_gumbel_temperature_anneals_exponentially():
    m = get_config("tiny").model
    temps = [float(gumbel_temperature(m, jnp.asarray(s))) for s in (0, m.gumbel_anneal_steps // 2,
                                                                     m.gumbel_anneal_steps, 10 * m.gumbel_anneal_steps)]
    np.testing.assert_allclose(temps, [2.0, 1.0, 0.5, 0.5], rtol=1e-5)


# --- the whole model -------------------------------------------------------------------------
def test_sharded_forward_and_loss_equal_one_device():
    c = stage_config("ssl", {"data.path": "unused", "data.crop_seconds": 0.8})
    task = SSLTask(c)
    audio = jax.random.normal(jax.random.key(0), (8, task.crop_samples)) * 0.1
    boxed = jax.jit(task.init_params)(jax.random.key(1))
    params = jax.device_get(nn.meta.unbox(boxed))
    loss_fn = lambda p, a: task.loss(p, {"audio": a}, jax.random.key(2))  # noqa: E731
    want_loss, want = jax.jit(loss_fn)(params, audio)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with activate(mesh, DEFAULT_RULES):
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_RULES)
        sharded = jax.device_put(params, shardings)
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
        got_loss, got = jax.jit(loss_fn)(sharded, jax.device_put(audio, rows))
    fc1 = sharded["blocks_0"]["ffn_in"]["fc1"]["kernel"]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")  # MLP over tensor, embed over fsdp
    assert sharded["blocks_0"]["attn"]["query"]["kernel"].sharding.spec[1] == "tensor"  # heads over tensor
    assert sharded["blocks_0"]["conv"]["depthwise"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert sharded["feature_encoder"]["conv_1"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-4)
    for k in ("accuracy", "code_perplexity", "prob_perplexity"):
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-4)
    assert float(want["chance"]) == pytest.approx(1 / 11)


def test_ten_seconds_give_250_tokens():
    task = SSLTask(stage_config("ssl", {"data.path": "unused"}))
    params = jax.eval_shape(lambda: nn.meta.unbox(task.init_params(jax.random.key(0))))
    centroids = jax.ShapeDtypeStruct((1024, 64), jnp.float32)
    out = jax.eval_shape(lambda p, c, a: tokenize(task.model, 1, p, c, a), params, centroids,
                         jax.ShapeDtypeStruct((3, 240000), jnp.float32))
    assert out.shape == (3, 250) and out.dtype == jnp.int32
    assert task.model.hop == 960


@pytest.mark.parametrize("preset,low,high", [("tiny", 0.1e6, 0.2e6), ("paper", 197.5e6, 201.5e6)])
def test_parameter_counts(preset, low, high):
    """Paper: 199.5M (DESIGN §4.2); ours 200.6M, within 1 %."""
    task = SSLTask(stage_config("ssl", {"data.path": "unused"}, preset=preset))
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    n = sum(x.size for x in jax.tree.leaves(shapes))
    assert low <= n <= high, n
