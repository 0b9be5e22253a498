"""Codebook interleaving patterns: round trips, layouts and causality checked from the step tables."""
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melody_jax.models.codebook_patterns import PATTERNS, DelayPattern, make_pattern, visibility

SPECIAL = 2048  # the codec's vocabulary size: one past the last real code


@st.composite
def patterns(draw, max_k=6, name=None):
    """(name, pattern) with each pattern's options drawn too (delays in any order, gaps in flattening)."""
    name = name or draw(st.sampled_from(sorted(PATTERNS)))
    k = draw(st.integers(1, max_k))
    ints = functools.partial(st.lists, st.integers(0, 4))
    options = {}
    if name == "delay":
        options = {"delays": draw(ints(min_size=k, max_size=k)), "flatten_first": draw(st.integers(0, 3)),
                   "empty_initial": draw(st.integers(0, 2))}
    elif name == "unroll":
        flattening = sorted(draw(ints(min_size=k, max_size=k)))
        inner_delay = draw(ints(min_size=5, max_size=5))
        options = {"flattening": flattening, "delays": [inner_delay[f] for f in flattening]}
    elif name == "coarse_first":
        options = {"delays": draw(ints(min_size=k - 1, max_size=k - 1))}
    elif name == "musiclm":
        options = {"group_by": draw(st.sampled_from([g for g in range(1, k + 1) if k % g == 0]))}
    return name, make_pattern(name, k, **options)


@settings(max_examples=60, deadline=None, derandomize=True)
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
    d = getattr(pattern, "delays", None)
    if name == "parallel":
        return t2 < t
    if name == "delay":
        first = pattern.flatten_first
        if t < first or t2 < first:
            return t2 < first and (t >= first or (t2, k2) < (t, k))
        return t2 + d[k2] < t + d[k]
    if name == "unroll":
        f = pattern.flattening
        return (t2 + d[k2], t2, f[k2]) < (t + d[k], t, f[k])
    if name == "coarse_first":
        if k == 0:
            return k2 == 0 and t2 < t
        return k2 == 0 or t2 + d[k2 - 1] < t + d[k - 1]
    if name == "musiclm":
        g = pattern.group_by
        return k2 // g < k // g or (k2 // g == k // g and (t2, k2) < (t, k))
    raise AssertionError(name)


def _expected_steps(name, pattern, num_t):
    """The sequence length each pattern's docstring promises."""
    k, d = pattern.num_codebooks, getattr(pattern, "delays", None)
    if name == "parallel":
        return num_t
    if name == "delay":
        first = pattern.flatten_first
        return pattern.empty_initial + k * min(num_t, first) + max(num_t + max(d) - first, 0)
    if name == "unroll":
        inner = dict(zip(pattern.flattening, d))
        return (max(pattern.flattening) + 1) * (num_t + max(d)) - sum(inner.values())
    if name == "coarse_first":
        return num_t if k == 1 else 2 * num_t + max(d)
    if name == "musiclm":
        return k * num_t
    raise AssertionError(name)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(patterns(max_k=5), st.integers(1, 10))
def test_visibility_matches_documented_causality(named, num_t):
    name, pattern = named
    k = pattern.num_codebooks
    assert pattern.num_steps(num_t) == _expected_steps(name, pattern, num_t)
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


def test_audiocraft_option_layouts():
    """audiocraft's examples (codebook k of frame t holds 10·k + t), without its leading empty step."""
    codes = (10 * np.arange(3)[:, None] + np.arange(4)[None, :])[None].astype(np.int32)
    s = -1

    def layout(name, k=3, **options):
        return np.asarray(make_pattern(name, k, **options).build(jnp.asarray(codes[:, :k]), s))[0].tolist()

    # Unrolled, codebooks 1 and 2 flattened together and delayed by 3 frames.
    assert layout("unroll", flattening=[0, 1, 1], delays=[0, 3, 3]) == [
        [0, 1, 2, s, 3, s, s, s, s, s, s],
        [s, s, s, 10, s, 11, s, 12, s, 13, s],
        [s, s, s, 20, s, 21, s, 22, s, 23, s]]
    # An unused inner step (flattening [0, 2]) is an empty step in every frame.
    assert layout("unroll", k=2, flattening=[0, 2]) == [
        [s, 0, s, s, 1, s, s, 2, s, s, 3, s],
        [s, s, 10, s, s, 11, s, s, 12, s, s, 13]]
    # Delayed after one empty step and two flattened frames.
    assert layout("delay", flatten_first=2, empty_initial=1) == [
        [s, 0, s, s, 1, s, s, 2, 3, s, s],
        [s, s, 10, s, s, 11, s, s, 12, 13, s],
        [s, s, s, 20, s, s, 21, s, s, 22, 23]]
    assert layout("coarse_first", delays=[0, 1]) == [
        [0, 1, 2, 3, s, s, s, s, s],
        [s, s, s, s, 10, 11, 12, 13, s],
        [s, s, s, s, s, 20, 21, 22, 23]]
    codes = np.concatenate([codes, codes[:, :1] + 30], axis=1)  # four codebooks, grouped by two
    assert layout("musiclm", k=4) == [
        [0, s, 1, s, 2, s, 3, s, s, s, s, s, s, s, s, s],
        [s, 10, s, 11, s, 12, s, 13, s, s, s, s, s, s, s, s],
        [s, s, s, s, s, s, s, s, 20, s, 21, s, 22, s, 23, s],
        [s, s, s, s, s, s, s, s, s, 30, s, 31, s, 32, s, 33]]


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
    with pytest.raises(ValueError, match="only meaningful"):
        make_pattern("delay", 4, flattening=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="group_by=3 must divide"):
        make_pattern("musiclm", 4, group_by=3)
    with pytest.raises(ValueError, match="one delay"):
        make_pattern("unroll", 3, flattening=[0, 1, 1], delays=[0, 1, 2])
    with pytest.raises(ValueError, match="non-decreasing"):
        make_pattern("unroll", 3, flattening=[1, 0, 2])
    with pytest.raises(ValueError, match="delays must be 2"):
        make_pattern("coarse_first", 3, delays=[0, 1, 2])
    with pytest.raises(ValueError, match="must be an int"):
        make_pattern("delay", 4, flatten_first=[1])


def test_config_options_reach_the_pattern():
    from melody_jax.frozen.stage_models import musicgen_pattern
    from melody_jax.training.errors import ConfigError
    from melody_jax.tasks.registry import get_task
    from tests.helpers import stage_config

    c = stage_config("musicgen", {"model.pattern": "unroll", "model.flattening": "[0,1,1,1]", "model.delays": "[0,2,2,2]"})
    get_task(c).validate()
    assert musicgen_pattern(c.model) == make_pattern("unroll", 4, [0, 2, 2, 2], flattening=[0, 1, 1, 1])
    with pytest.raises(ConfigError, match="group_by=3 must divide"):
        get_task(stage_config("musicgen", {"model.pattern": "musiclm", "model.group_by": "3"})).validate()
