"""Pattern properties through the LM's own input path: round trips, special slots, delay length, causality.

Causality is checked mechanically: codes get unique ids, the sequence goes through `build` and the
LM's `shift_right`, and at every position s (which predicts step s under causal attention) the ids
the model can read must be exactly the codes placed at steps < s — never one from its future.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melody_jax.models.musicgen_lm import shift_right
from melody_jax.models.codebook_patterns import PATTERNS, make_pattern
from tests.test_patterns import patterns

SPECIAL = 2048
NAMES = sorted(PATTERNS)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data(), num_t=st.integers(1, 16), batch=st.integers(1, 2), seed=st.integers(0, 2**31 - 1))
def test_revert_build_round_trip_and_special_slots(name, data, num_t, batch, seed):
    _, pattern = data.draw(patterns(max_k=5, name=name))
    k = pattern.num_codebooks
    codes = np.random.default_rng(seed).integers(0, SPECIAL, (batch, k, num_t)).astype(np.int32)
    seq = np.asarray(pattern.build(jnp.asarray(codes), SPECIAL))
    empty = pattern.time_of(num_t) < 0
    assert seq.shape == (batch, k, pattern.num_steps(num_t))
    np.testing.assert_array_equal(seq == SPECIAL, np.broadcast_to(empty, seq.shape))  # special ⇔ empty slot
    reverted, valid = pattern.revert(jnp.asarray(seq))
    assert valid.all()
    np.testing.assert_array_equal(np.asarray(reverted), codes)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(num_t=st.integers(1, 200))
def test_delay_has_t_plus_3_steps_for_4_codebooks(num_t):
    pattern = make_pattern("delay", 4)
    assert pattern.num_steps(num_t) == num_t + 3
    seq = pattern.build(jnp.zeros((1, 4, num_t), jnp.int32), SPECIAL)
    assert seq.shape[-1] == num_t + 3
    assert int((seq == SPECIAL).sum()) == 4 * 3  # each codebook padded by its delay on one side, 3 − delay on the other


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(data=st.data(), num_t=st.integers(1, 9))
def test_lm_inputs_never_show_a_code_from_its_future(name, data, num_t):
    _, pattern = data.draw(patterns(max_k=4, name=name))
    k = pattern.num_codebooks
    frame_causal = name == "parallel" or (name == "unroll" and not any(pattern.delays))
    ids = np.arange(k * num_t, dtype=np.int32).reshape(1, k, num_t)  # id = k_index · T + t
    inputs = np.asarray(shift_right(pattern.build(jnp.asarray(ids), SPECIAL), SPECIAL))[0]
    step_of = pattern.step_of(num_t).reshape(-1)
    frame_of = np.tile(np.arange(num_t), k)
    book_of = np.repeat(np.arange(k), num_t)
    time_of = pattern.time_of(num_t)
    for s in range(inputs.shape[1]):
        seen = inputs[:, : s + 1]
        seen = seen[seen != SPECIAL]
        assert (step_of[seen] < s).all(), f"{name}: position {s} reads a code of step >= {s}"
        np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(step_of < s))  # and everything earlier
        for book in range(k):  # the code predicted at s never sees its own codebook's present or future
            t = time_of[book, s]
            if t >= 0:
                assert not ((book_of[seen] == book) & (frame_of[seen] >= t)).any()
                if frame_causal:  # no later frame of any codebook
                    assert (frame_of[seen] <= t).all() and (frame_of[seen][book_of[seen] >= book] < t).all()
