"""Segmentation into half-overlapping segments and overlap-add back."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.nn.segment import num_segments, overlap_add, segment


def test_paper_sizes():
    assert num_segments(2500, 64) == 80
    x = jnp.zeros((1, 2500, 2))
    assert jax.eval_shape(lambda x: segment(x, 64), x).shape == (1, 80, 64, 2)


@pytest.mark.parametrize("length,k", [(16, 8), (17, 8), (3, 8), (1, 2), (100, 64), (2500, 64)])
def test_segments_are_padded_windows_and_overlap_add_inverts_exactly(length, k):
    hop = k // 2
    x = jax.random.normal(jax.random.key(length), (2, length, 3))
    seg = segment(x, k)
    s = -(-length // hop) + 1
    assert seg.shape == (2, s, k, 3) == (2, num_segments(length, k), k, 3)
    padded = np.zeros((2, (s + 1) * hop, 3), np.float32)
    padded[:, hop : hop + length] = x
    for i in (0, s // 2, s - 1):
        np.testing.assert_array_equal(seg[:, i], padded[:, i * hop : i * hop + k])
    np.testing.assert_array_equal(overlap_add(seg, length), x)


def test_overlap_add_averages_the_two_copies():
    seg = jnp.arange(3 * 4, dtype=jnp.float32).reshape(1, 3, 4, 1)  # S = 3, K = 4, L ≤ 4
    out = overlap_add(seg, 4)[0, :, 0]
    # Frames 0-1: segment 1 first half (4, 5) with segment 0 second half (2, 3); frames 2-3:
    # segment 2 first half (8, 9) with segment 1 second half (6, 7).
    np.testing.assert_array_equal(out, [3.0, 4.0, 7.0, 8.0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="even"):
        segment(jnp.zeros((1, 8, 1)), 5)
    with pytest.raises(ValueError, match="cover"):
        overlap_add(jnp.zeros((1, 3, 4, 1)), 9)
