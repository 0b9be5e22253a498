"""Convolutions whose kernels carry logical axis names, and HiFi-GAN's residual blocks.

Kernels are `[k, in, out]` (1-D, NWC) or `[kh, kw, in, out]` (2-D, NHWC) named
`(kernel, ..., conv_in, conv_out)`, so the rules can shard channels over `fsdp`/`tensor`. A
channel axis of size 1 (mono audio in, a logit out) is left unnamed: it cannot be split.
All padding is explicit so output lengths are exact multiples/divisors of input lengths.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

LRELU_SLOPE = 0.1  # HiFi-GAN's


def _channel_name(size: int, name: str) -> str | None:
    return name if size > 1 else None


class Conv(nn.Module):
    """N-d convolution (N = len(kernel)), channels-last, explicit `padding` per spatial dim.

    `lhs_dilation` > 1 makes it a transposed (up-sampling) convolution: zeros are inserted
    between input samples before a stride-1 convolution.
    """

    features: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: tuple[tuple[int, int], ...] | None = None  # None: "same" for odd kernels at stride 1
    dilation: tuple[int, ...] | None = None
    lhs_dilation: tuple[int, ...] | None = None
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = len(self.kernel)
        dilation = self.dilation or (1,) * n
        padding = self.padding or tuple(((k - 1) * d // 2, (k - 1) * d - (k - 1) * d // 2)
                                        for k, d in zip(self.kernel, dilation))
        c_in = x.shape[-1]
        names = ("kernel",) + (None,) * (n - 1) + (  # a logical name may appear once per array
            _channel_name(c_in, "conv_in"), _channel_name(self.features, "conv_out"))
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n + 1)),
                                                out_axis=n + 1)
        w = self.param("kernel", nn.with_logical_partitioning(init, names), (*self.kernel, c_in, self.features),
                       jnp.float32)
        spatial = "".join("HW"[:n]) if n == 2 else "W"
        dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w.astype(self.dtype), window_strides=self.strides or (1,) * n, padding=padding,
            lhs_dilation=self.lhs_dilation, rhs_dilation=dilation, dimension_numbers=dims)
        if self.use_bias:
            b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)),
                           (self.features,), jnp.float32)
            y = y + b.astype(self.dtype)
        return y


def conv1d(features: int, kernel: int, *, stride: int = 1, dilation: int = 1, dtype=jnp.float32,
           name: str | None = None) -> Conv:
    """'Same' 1-D conv at stride 1; at stride s (T divisible by s) the output has exactly T / s frames."""
    total = (kernel - 1) * dilation - (stride - 1)
    return Conv(features, (kernel,), (stride,), ((total // 2, total - total // 2),), (dilation,), dtype=dtype,
                name=name)


def upsample1d(features: int, kernel: int, rate: int, *, split: str = "left", dtype=jnp.float32,
               name: str | None = None) -> "Upsample":
    """Transposed 1-D conv with exactly `rate`·T output frames (any kernel/rate parity)."""
    return Upsample(features, kernel, rate, split, dtype=dtype, name=name)


def _polyphase(kernel: int, rate: int, lo: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Index table turning a transposed-conv kernel `[k, in, out]` into a stride-1 kernel
    `[window, in, rate·out]` (one output channel group per phase), its validity mask and the
    (left, right) padding. Same as `Conv(lhs_dilation=rate)` with padding (lo, k + rate − 2 − lo)."""
    taps = {}  # phase → {input offset: kernel tap}
    for p in range(rate):
        for j in range(kernel):
            if (p + j - lo) % rate == 0:
                taps.setdefault(p, {})[(p + j - lo) // rate] = j
    offsets = [o for t in taps.values() for o in t]
    first, last = min(offsets), max(offsets)
    index = np.zeros((last - first + 1, rate), np.int32)
    mask = np.zeros((last - first + 1, rate), np.float32)
    for p, t in taps.items():
        for o, j in t.items():
            index[o - first, p], mask[o - first, p] = j, 1.0
    return index, mask, -first, last


def split_padding(total: int, split: str) -> tuple[int, int]:
    """(left, right) halves of `total` padding: "left" gives the left ⌊total/2⌋ (our convs' default),
    "right" gives the right ⌊total/2⌋ (EnCodec's non-causal convs: odd strides differ by one)."""
    if split not in ("left", "right"):
        raise ValueError(f"split must be 'left' or 'right', got {split!r}")
    small = total // 2
    return (small, total - small) if split == "left" else (total - small, small)


class Upsample(nn.Module):
    """Transposed convolution computed polyphase: one stride-1 conv with `rate`·out channels, then
    the phases interleaved. Equal to `Conv(lhs_dilation=rate)` on the same `[k, in, out]` kernel
    (tested), without convolving the inserted zeros (XLA:CPU's dilated-input path is ~10× slower).

    The kernel is in correlation order: a torch `ConvTranspose1d` weight `[in, out, k]` is this kernel
    reversed along k. Of the full transposed output ((T − 1)·rate + k frames), k − rate are trimmed,
    split by `split_padding(k − rate, split)` ("right": EnCodec's trim)."""

    features: int
    kernel: int
    rate: int
    split: str = "left"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c_in = x.shape[-1]
        names = ("kernel", _channel_name(c_in, "conv_in"), _channel_name(self.features, "conv_out"))
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
        w = self.param("kernel", nn.with_logical_partitioning(init, names), (self.kernel, c_in, self.features),
                       jnp.float32)
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)),
                       (self.features,), jnp.float32)
        trim_left, _ = split_padding(self.kernel - self.rate, self.split)
        index, mask, left, right = _polyphase(self.kernel, self.rate, self.kernel - 1 - trim_left)
        phased = w[index] * mask[..., None, None]  # [window, rate, in, out]
        phased = phased.transpose(0, 2, 1, 3).reshape(len(index), c_in, self.rate * self.features)
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), phased.astype(self.dtype), (1,), ((left, right),),
                                         dimension_numbers=("NWC", "WIO", "NWC"))
        y = y.reshape(*y.shape[:-1], self.rate, self.features).reshape(y.shape[0], -1, self.features)
        return y + b.astype(self.dtype)


class ResBlock(nn.Module):
    """HiFi-GAN residual block at one kernel size: `kind=1` two convs per dilation (the second at
    dilation 1), `kind=2` one conv per dilation; leaky-ReLU before each conv, residual after each pair."""

    channels: int
    kernel: int
    dilations: Sequence[int]
    kind: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for d in self.dilations:
            y = conv1d(self.channels, self.kernel, dilation=d, dtype=self.dtype)(nn.leaky_relu(x, LRELU_SLOPE))
            if self.kind == 1:
                y = conv1d(self.channels, self.kernel, dtype=self.dtype)(nn.leaky_relu(y, LRELU_SLOPE))
            x = x + y
        return x


class MRF(nn.Module):
    """Multi-receptive-field fusion: the mean of one ResBlock per kernel size (HiFi-GAN)."""

    channels: int
    kernels: Sequence[int]
    dilations: Sequence[int]
    kind: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        outs = [ResBlock(self.channels, k, tuple(self.dilations), self.kind, self.dtype)(x) for k in self.kernels]
        return sum(outs) / len(outs)


def constrain(x: jax.Array) -> jax.Array:
    """Block-boundary constraint for `[B, T, C]` activations: batch-sharded, channels left to XLA."""
    return nn.with_logical_constraint(x, ("batch", "length", None))
