"""Codebook interleaving patterns: round trips, layouts and causality checked from the step tables."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melody_jax.tokenizers.patterns import PATTERNS, DelayPattern, make_pattern, visibility

SPECIAL = 2048  # the codec's vocabulary size: one past the last real code


@st.composite
def patterns(draw, max_k=6):
    name = draw(st.sampled_from(sorted(PATTERNS)))
    k = draw(st.integers(1, max_k))
    delays = draw(st.lists(st.integers(0, 4), min_size=k, max_size=k)) if name == "delay" else None
    return name, make_pattern(name, k, delays)


@settings(max_examples=60, deadline=None)
@given(patterns(), st.integers(1, 24), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_revert_inverts_build(named, num_t, batch, seed):
    _, pattern = named
    k = pattern.num_codebooks
    codes = np.random.default_rng(seed).integers(0, SPECIAL, (batch, k, num_t)).astype(np.int32)
    seq = pattern.build(jnp.asarray(codes), SPECIAL)
    assert seq.shape == (batch, k, pattern.num_steps(num_t)) and seq.dtype == jnp.int32
    assert int((seq != SPECIAL).sum()) == batch * k * num_t, "every code placed exactly once"
    assert pattern.max_timesteps(seq.shape[-1]) == num_t
    reverted, valid = pattern.revert(seq)
    assert valid.shape == (k, num_t) and valid.all()
    np.testing.assert_array_equal(np.asarray(reverted), codes)


def _expected_visible(name, pattern, k, t, k2, t2):
    """The closed-form visibility each pattern's docstring promises."""
    if name == "parallel":
        return t2 < t
    if name == "delay":
        d = pattern.delays
        return t2 + d[k2] < t + d[k]
    if name == "unroll":
        return t2 < t or (t2 == t and k2 < k)
    if name == "coarse_first":
        return (k2 == 0 and t2 < t) if k == 0 else (k2 == 0 or t2 < t)
    raise AssertionError(name)


@settings(max_examples=40, deadline=None)
@given(patterns(max_k=5), st.integers(1, 10))
def test_visibility_matches_documented_causality(named, num_t):
    name, pattern = named
    k = pattern.num_codebooks
    vis = visibility(pattern, num_t)
    for a, t, b, t2 in itertools.product(range(k), range(num_t), range(k), range(num_t)):
        assert vis[a, t, b, t2] == _expected_visible(name, pattern, a, t, b, t2), (name, (a, t), (b, t2))
    # Every pattern: a code sees its own codebook's past and never its own present or future.
    for a in range(k):
        own = vis[a, :, a, :]
        np.testing.assert_array_equal(own, np.tril(np.ones((num_t, num_t), bool), -1))


def test_delay_default_layout_and_step_count():
    pattern = make_pattern("delay", 4)
    assert pattern.delays == (0, 1, 2, 3) and pattern.num_steps(50) == 53
    codes = (10 * np.arange(4)[:, None] + np.arange(3)[None, :])[None].astype(np.int32)
    s = -1
    expected = [
        [0, 1, 2, s, s, s],
        [s, 10, 11, 12, s, s],
        [s, s, 20, 21, 22, s],
        [s, s, s, 30, 31, 32],
    ]
    np.testing.assert_array_equal(np.asarray(pattern.build(jnp.asarray(codes), s))[0], expected)


def test_unroll_and_coarse_first_layouts():
    codes = (10 * np.arange(3)[:, None] + np.arange(2)[None, :])[None].astype(np.int32)
    s = -1
    unroll = np.asarray(make_pattern("unroll", 3).build(jnp.asarray(codes), s))[0]
    np.testing.assert_array_equal(unroll, [[0, s, s, 1, s, s], [s, 10, s, s, 11, s], [s, s, 20, s, s, 21]])
    coarse = np.asarray(make_pattern("coarse_first", 3).build(jnp.asarray(codes), s))[0]
    np.testing.assert_array_equal(coarse, [[0, 1, s, s], [s, s, 10, 11], [s, s, 20, 21]])


def test_jit_prefix_revert_and_logits():
    pattern = make_pattern("delay", 4)
    num_t, vocab = 7, 5
    codes = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (2, 4, num_t)), jnp.int32)
    seq = jax.jit(lambda c: pattern.build(c, vocab))(codes)
    np.testing.assert_array_equal(np.asarray(seq), np.asarray(pattern.build(codes, vocab)))
    # A prefix of 5 steps (mid-sampling): only codes placed at steps < 5 are valid.
    prefix = jax.jit(lambda s: pattern.revert(s, num_t)[0])(seq[:, :, :5])
    valid = pattern.revert(seq[:, :, :5], num_t)[1]
    np.testing.assert_array_equal(valid, pattern.step_of(num_t) < 5)
    np.testing.assert_array_equal(np.asarray(prefix), np.where(valid, np.asarray(codes), 0))
    # Trailing axes ride along: one-hot "logits" [B, K, S, V+1] revert to [B, K, T, V+1].
    logits, _ = pattern.revert(jax.nn.one_hot(seq, vocab + 1))
    np.testing.assert_array_equal(np.asarray(logits.argmax(-1)), np.asarray(codes))


def test_bad_pattern_configs():
    with pytest.raises(ValueError, match="unknown codebook pattern"):
        make_pattern("zigzag", 4)
    with pytest.raises(ValueError, match="delays must be"):
        DelayPattern(4, (0, 1, 2))
    with pytest.raises(ValueError, match="only meaningful"):
        make_pattern("parallel", 4, delays=[0, 1, 2, 3])
