"""MusicGen's audio codec (DESIGN §6): SEANet-style conv encoder/decoder around an RVQ.

32 kHz, strides (8, 5, 4, 4) → 640 samples per frame (50 Hz), 128-d latent, RVQ 4 × 2048 with EMA
codebooks, k-means init and dead-code restart (melody_jax/nn/quantizers.py). Encoder: conv(7) →
per stride s: residual unit (ELU, conv(3), ELU, conv(1)) → ELU → conv(2s, stride s) doubling the
width → [LSTM] → ELU → conv(7) to the latent. The decoder mirrors it with transposed convs
(polyphase) and ends in a plain conv(7) (no tanh, as audiocraft).

The defaults (what the codec stage trains) are convolutions only, zero padding, ⌊total/2⌋ of each
conv's padding on the left. `SEANetOptions` switches on what EnCodec (facebook/encodec_32khz, which
the public MusicGen checkpoints use) has instead, so converted weights compute the same function:
a 2-layer LSTM with a residual skip at the bottleneck of both halves, reflect padding with the
larger half on the left (right = ⌊total/2⌋; also the transposed convs' trim), each strided conv's
input padded on the right to a whole number of strides (any length encodes, as in EnCodec), and
optionally 1×1-conv shortcuts in the residual units. Weight norm is folded into the kernels at
conversion (melody_jax/convert/hf_encodec.py).

Codebooks live in the `"vq_stats"` collection; training calls the model with
`mutable=["vq_stats"], rngs={"vq": key}` and `update=True`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.conv import Conv, constrain, split_padding, upsample1d
from melody_jax.nn.quantizers import VQ_COLLECTION, QuantizerOutput, ResidualVectorQuantizer


@dataclasses.dataclass(frozen=True)
class SEANetOptions:
    """Architecture switches; the defaults are the codec stage's own, `ENCODEC` matches EnCodec."""

    lstm_layers: int = 0  # stacked LSTMs (+ input) after the last downsampling / first decoder conv
    pad_mode: str = "zeros"  # zeros | reflect
    split: str = "left"  # which side gets ⌊total/2⌋ of a conv's padding / a transposed conv's trim
    conv_shortcut: bool = False  # residual units add conv1x1(x) instead of x

    def __post_init__(self):
        if self.pad_mode not in ("zeros", "reflect"):
            raise ValueError(f"pad_mode must be 'zeros' or 'reflect', got {self.pad_mode!r}")
        split_padding(0, self.split)  # validates


ENCODEC = SEANetOptions(lstm_layers=2, pad_mode="reflect", split="right")


def _reflect_pad(x: jax.Array, left: int, right: int) -> jax.Array:
    """Reflect padding of `[B, T, C]` along T; inputs no longer than the padding are first extended
    with zeros on the right (and those cut again after), as EnCodec does."""
    extra = max(0, max(left, right) - x.shape[1] + 1)
    x = jnp.pad(x, ((0, 0), (0, extra), (0, 0)))
    y = jnp.pad(x, ((0, 0), (left, right), (0, 0)), mode="reflect")
    return y[:, :y.shape[1] - extra]


def _conv(x: jax.Array, features: int, kernel: int, options: SEANetOptions, dtype: jnp.dtype, *,
          stride: int = 1, dilation: int = 1, name: str | None = None) -> jax.Array:
    """A conv whose output has ⌈T / stride⌉ frames (the input is padded right to whole strides)."""
    left, right = split_padding((kernel - 1) * dilation + 1 - stride, options.split)
    right += -x.shape[1] % stride
    if options.pad_mode == "reflect":
        x, left, right = _reflect_pad(x, left, right), 0, 0
    return Conv(features, (kernel,), (stride,), ((left, right),), (dilation,), dtype=dtype, name=name)(x)


class LSTM(nn.Module):
    """`layers` stacked LSTMs over `[B, T, C]` (hidden size C, zero initial state) plus their input:
    EnCodec's bottleneck. Gates in torch's order (input, forget, cell, output); one bias per layer
    (torch's two are summed at conversion). Each layer's input projection for all steps is one matmul;
    only the recurrence runs in `lax.scan`."""

    layers: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        init = nn.initializers.lecun_normal()
        h = x.astype(self.dtype)
        for i in range(self.layers):
            w_in = self.param(f"input_kernel_{i}", nn.with_logical_partitioning(init, ("embed", "mlp")),
                              (c, 4 * c), jnp.float32).astype(self.dtype)
            w_rec = self.param(f"recurrent_kernel_{i}", nn.with_logical_partitioning(init, ("embed", "mlp")),
                               (c, 4 * c), jnp.float32).astype(self.dtype)
            bias = self.param(f"bias_{i}", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                              (4 * c,), jnp.float32).astype(self.dtype)

            def step(carry, gates_in, w_rec=w_rec):
                hidden, cell = carry
                i_gate, f_gate, g_gate, o_gate = jnp.split(gates_in + hidden @ w_rec, 4, axis=-1)
                cell = jax.nn.sigmoid(f_gate) * cell + jax.nn.sigmoid(i_gate) * jnp.tanh(g_gate)
                hidden = jax.nn.sigmoid(o_gate) * jnp.tanh(cell)
                return (hidden, cell), hidden

            zeros = jnp.zeros((x.shape[0], c), self.dtype)
            gates = jnp.swapaxes(h @ w_in + bias, 0, 1)  # [T, B, 4C]
            h = jnp.swapaxes(jax.lax.scan(step, (zeros, zeros), gates)[1], 0, 1)
        return x + h.astype(x.dtype)


class ResidualUnit(nn.Module):
    channels: int
    dilation: int = 1
    options: SEANetOptions = SEANetOptions()
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        o = self.options
        y = _conv(nn.elu(x), self.channels // 2, 3, o, self.dtype, dilation=self.dilation)
        y = _conv(nn.elu(y), self.channels, 1, o, self.dtype)
        return (_conv(x, self.channels, 1, o, self.dtype, name="shortcut") if o.conv_shortcut else x) + y


class SEANetEncoder(nn.Module):
    strides: Sequence[int] = (8, 5, 4, 4)  # applied in reverse order, as audiocraft's encoder
    channels: int = 32
    latent_dim: int = 128
    dtype: jnp.dtype = jnp.float32
    options: SEANetOptions = SEANetOptions()

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        o = self.options
        x = _conv(audio[..., None].astype(self.dtype), self.channels, 7, o, self.dtype)
        width = self.channels
        for s in reversed(self.strides):
            x = ResidualUnit(width, options=o, dtype=self.dtype)(x)
            width *= 2
            x = constrain(_conv(nn.elu(x), width, 2 * s, o, self.dtype, stride=s))
        if o.lstm_layers:
            x = LSTM(o.lstm_layers, self.dtype, name="lstm")(x)
        return _conv(nn.elu(x), self.latent_dim, 7, o, self.dtype).astype(jnp.float32)


class SEANetDecoder(nn.Module):
    strides: Sequence[int] = (8, 5, 4, 4)
    channels: int = 32
    dtype: jnp.dtype = jnp.float32
    options: SEANetOptions = SEANetOptions()

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        o = self.options
        width = self.channels * 2 ** len(self.strides)
        x = _conv(z.astype(self.dtype), width, 7, o, self.dtype)
        if o.lstm_layers:
            x = LSTM(o.lstm_layers, self.dtype, name="lstm")(x)
        for s in self.strides:
            width //= 2
            x = constrain(upsample1d(width, 2 * s, s, split=o.split, dtype=self.dtype)(nn.elu(x)))
            x = ResidualUnit(width, options=o, dtype=self.dtype)(x)
        return _conv(nn.elu(x), 1, 7, o, self.dtype)[..., 0].astype(jnp.float32)


class Codec(nn.Module):
    encoder: SEANetEncoder
    decoder: SEANetDecoder
    quantizer: ResidualVectorQuantizer

    @property
    def hop(self) -> int:
        return math.prod(self.encoder.strides)

    def __call__(self, audio: jax.Array, *, update: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """`[B, T]` (T divisible by the hop) → (reconstruction `[B, T]`, quantizer output)."""
        q = self.quantizer(self.encoder(audio), update=update)
        return self.decoder(q.quantized), q

    def encode(self, audio: jax.Array) -> jax.Array:
        """`[B, T]` → `int32 [B, n_q, T / hop]` (MusicGen's token layout)."""
        return jnp.swapaxes(self.quantizer.encode(self.encoder(audio)), 1, 2)

    def decode(self, codes: jax.Array) -> jax.Array:
        """`int [B, n_q, L]` → `[B, L · hop]`."""
        return self.decoder(self.quantizer.decode(jnp.swapaxes(codes, 1, 2)))


def encode(variables: dict[str, Any], audio: jax.Array, model: Codec) -> jax.Array:
    """Audio `[B, T]` (zero-padded to whole frames) → codes `int32 [B, n_q, ceil(T / hop)]`.

    `variables` = `{"params": ..., "vq_stats": ...}` (the codec stage's generator and its state).
    """
    audio = jnp.asarray(audio, jnp.float32)
    if model.encoder.options.pad_mode == "zeros":  # reflect: each strided conv pads itself (EnCodec)
        audio = jnp.pad(audio, ((0, 0), (0, -audio.shape[-1] % model.hop)))
    return model.apply(variables, audio, method=Codec.encode)


def decode(variables: dict[str, Any], codes: jax.Array, model: Codec) -> jax.Array:
    return model.apply(variables, codes, method=Codec.decode)


def build(model_config: Any) -> Codec:
    """The codec a config describes; configs written before the EnCodec options get the defaults."""
    m, dtype = model_config, jnp.dtype(model_config.dtype)
    q = m.quantizer
    options = SEANetOptions(**{f.name: m.get(f.name, f.default) for f in dataclasses.fields(SEANetOptions)})
    return Codec(SEANetEncoder(tuple(m.strides), m.channels, m.latent_dim, dtype, options),
                 SEANetDecoder(tuple(m.strides), m.channels, dtype, options),
                 ResidualVectorQuantizer(q.num_quantizers, q.codebook_size, m.latent_dim, q.decay,
                                         q.epsilon, q.dead_code_threshold, q.kmeans_init, q.kmeans_iters))


__all__ = ["Codec", "ENCODEC", "LSTM", "SEANetDecoder", "SEANetEncoder", "SEANetOptions", "VQ_COLLECTION", "build",
           "decode", "encode"]
