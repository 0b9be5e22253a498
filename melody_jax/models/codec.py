"""MusicGen's audio codec (DESIGN §6): SEANet-style conv encoder/decoder around an RVQ.

32 kHz, strides (8, 5, 4, 4) → 640 samples per frame (50 Hz), 128-d latent, RVQ 4 × 2048 with EMA
codebooks, k-means init and dead-code restart (melody_jax/nn/quantizers.py). Encoder: conv(7) →
per stride s: residual unit (ELU, conv(3), ELU, conv(1)) → ELU → conv(2s, stride s) doubling the
width → ELU → conv(7) to the latent. The decoder mirrors it with transposed convs (polyphase) and
ends in a plain conv(7) (no tanh, as audiocraft). [choice: audiocraft's two LSTM layers at the
bottleneck are left out; convolutions only.]

Codebooks live in the `"vq_stats"` collection; training calls the model with
`mutable=["vq_stats"], rngs={"vq": key}` and `update=True`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.conv import conv1d, constrain, upsample1d
from melody_jax.nn.quantizers import VQ_COLLECTION, QuantizerOutput, ResidualVectorQuantizer


class ResidualUnit(nn.Module):
    channels: int
    dilation: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = conv1d(self.channels // 2, 3, dilation=self.dilation, dtype=self.dtype)(nn.elu(x))
        return x + conv1d(self.channels, 1, dtype=self.dtype)(nn.elu(y))


class SEANetEncoder(nn.Module):
    strides: Sequence[int] = (8, 5, 4, 4)  # applied in reverse order, as audiocraft's encoder
    channels: int = 32
    latent_dim: int = 128
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> jax.Array:
        x = conv1d(self.channels, 7, dtype=self.dtype)(audio[..., None].astype(self.dtype))
        width = self.channels
        for s in reversed(self.strides):
            x = ResidualUnit(width, dtype=self.dtype)(x)
            width *= 2
            x = constrain(conv1d(width, 2 * s, stride=s, dtype=self.dtype)(nn.elu(x)))
        return conv1d(self.latent_dim, 7, dtype=self.dtype)(nn.elu(x)).astype(jnp.float32)


class SEANetDecoder(nn.Module):
    strides: Sequence[int] = (8, 5, 4, 4)
    channels: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        width = self.channels * 2 ** len(self.strides)
        x = conv1d(width, 7, dtype=self.dtype)(z.astype(self.dtype))
        for s in self.strides:
            width //= 2
            x = constrain(upsample1d(width, 2 * s, s, dtype=self.dtype)(nn.elu(x)))
            x = ResidualUnit(width, dtype=self.dtype)(x)
        return conv1d(1, 7, dtype=self.dtype)(nn.elu(x))[..., 0].astype(jnp.float32)


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
    extra = -audio.shape[-1] % model.hop
    audio = jnp.pad(jnp.asarray(audio, jnp.float32), ((0, 0), (0, extra)))
    return model.apply(variables, audio, method=Codec.encode)


def decode(variables: dict[str, Any], codes: jax.Array, model: Codec) -> jax.Array:
    return model.apply(variables, codes, method=Codec.decode)


def build(model_config: Any) -> Codec:
    m, dtype = model_config, jnp.dtype(model_config.dtype)
    q = m.quantizer
    return Codec(SEANetEncoder(tuple(m.strides), m.channels, m.latent_dim, dtype),
                 SEANetDecoder(tuple(m.strides), m.channels, dtype),
                 ResidualVectorQuantizer(q.num_quantizers, q.codebook_size, m.latent_dim, q.decay,
                                         q.epsilon, q.dead_code_threshold, q.kmeans_init, q.kmeans_iters))


__all__ = ["Codec", "SEANetDecoder", "SEANetEncoder", "VQ_COLLECTION", "build", "decode", "encode"]
