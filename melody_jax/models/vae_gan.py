"""Audio VAE-GAN (DESIGN §4.1): 24 kHz waveform ↔ 250 Hz × 16 latents in [-1, 1].

Encoder stage i: leaky-ReLU → strided conv `channels[i] → 2·channels[i]` (kernel k_i, stride r_i)
→ MRF at 2·channels[i]; then a conv to mean and log-variance (16 + 16). Decoder stage i (the
mirror, HiFi-GAN's generator): leaky-ReLU → transposed conv `2·channels[i] → channels[i]` (rate
u_i) → MRF at channels[i]; conv → tanh. `block` picks HiFi-GAN's ResBlock1 or ResBlock2.

Latents: z̄ ~ N(μ, σ²) in training (μ in evaluation and `encode`), z = clip(z̄ / 3, −1, 1); the
decoder sees z. Public `encode`/`decode` are jit-friendly pure functions of the generator params
`{"encoder": ..., "decoder": ...}`, usable frozen inside another stage's jitted step.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.conv import LRELU_SLOPE, MRF, conv1d, constrain, upsample1d

LOGVAR_RANGE = (-30.0, 20.0)


class Posterior(NamedTuple):
    mean: jax.Array  # [B, L, latent]
    logvar: jax.Array  # [B, L, latent], clamped to LOGVAR_RANGE

    def kl(self, reduction: str = "mean") -> jax.Array:
        """KL(q ‖ N(0, I)) averaged over every latent element ("mean": the 5e-3 weight does not scale
        with clip length), or summed over each example's latents and averaged over the batch ("sum":
        the usual VAE KL, with which the paper's weights sit in HiFi-GAN's summed reduction)."""
        terms = self.mean**2 + jnp.exp(self.logvar) - 1.0 - self.logvar
        return 0.5 * jnp.mean(jnp.sum(terms, axis=(1, 2)) if reduction == "sum" else terms)


class Encoder(nn.Module):
    latent_dim: int = 16
    rates: Sequence[int] = (2, 3, 4, 4)
    channels: Sequence[int] = (32, 64, 128, 256)
    kernels: Sequence[int] = (5, 7, 9, 9)
    block: int = 1
    mrf_kernels: Sequence[int] = (3, 7, 11)
    mrf_dilations: Sequence[int] = (1, 3, 5)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> Posterior:
        """`[B, T]` (T divisible by the hop) → posterior over `[B, T / hop, latent]`."""
        x = conv1d(self.channels[0], 7, dtype=self.dtype, name="conv_pre")(audio[..., None].astype(self.dtype))
        for i, (rate, ch, k) in enumerate(zip(self.rates, self.channels, self.kernels)):
            x = conv1d(2 * ch, k, stride=rate, dtype=self.dtype, name=f"down_{i}")(nn.leaky_relu(x, LRELU_SLOPE))
            x = constrain(MRF(2 * ch, self.mrf_kernels, self.mrf_dilations, self.block, self.dtype,
                              name=f"mrf_{i}")(x))
        stats = conv1d(2 * self.latent_dim, 7, dtype=self.dtype, name="conv_post")(nn.leaky_relu(x, LRELU_SLOPE))
        mean, logvar = jnp.split(stats.astype(jnp.float32), 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, *LOGVAR_RANGE))


class Decoder(nn.Module):
    rates: Sequence[int] = (4, 4, 3, 2)
    channels: Sequence[int] = (768, 384, 192, 96)
    kernels: Sequence[int] = (9, 9, 5, 7)
    block: int = 2
    mrf_kernels: Sequence[int] = (3, 7, 11)
    mrf_dilations: Sequence[int] = (1, 3, 5)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """`[B, L, latent]` → `float32 [B, L · hop]` in (−1, 1)."""
        x = conv1d(2 * self.channels[0], 7, dtype=self.dtype, name="conv_pre")(z.astype(self.dtype))
        for i, (rate, ch, k) in enumerate(zip(self.rates, self.channels, self.kernels)):
            x = upsample1d(ch, k, rate, dtype=self.dtype, name=f"up_{i}")(nn.leaky_relu(x, LRELU_SLOPE))
            x = constrain(MRF(ch, self.mrf_kernels, self.mrf_dilations, self.block, self.dtype, name=f"mrf_{i}")(x))
        x = conv1d(1, 7, dtype=self.dtype, name="conv_post")(nn.leaky_relu(x, 0.01))
        return jnp.tanh(x[..., 0].astype(jnp.float32))


class VAEGAN(nn.Module):
    """The generator: encoder + latent mapping + decoder. `__call__` reconstructs (for training)."""

    encoder: Encoder
    decoder: Decoder
    latent_scale: float = 3.0

    @property
    def hop(self) -> int:
        return math.prod(self.encoder.rates)

    def setup(self):
        if math.prod(self.decoder.rates) != self.hop:
            raise ValueError(f"decoder rates {self.decoder.rates} do not invert encoder rates {self.encoder.rates}")

    def posterior(self, audio: jax.Array) -> Posterior:
        return self.encoder(audio)

    def decode(self, z: jax.Array) -> jax.Array:
        return self.decoder(z)

    def __call__(self, audio: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, Posterior, jax.Array]:
        """(reconstruction `[B, T]`, posterior, mapped z). `key` samples z̄; None uses the mean."""
        post = self.encoder(audio)
        z = map_latent(sample(post, key), self.latent_scale)
        return self.decoder(z), post, z


def sample(post: Posterior, key: jax.Array | None) -> jax.Array:
    if key is None:
        return post.mean
    return post.mean + jnp.exp(0.5 * post.logvar) * jax.random.normal(key, post.mean.shape, post.mean.dtype)


def map_latent(z_bar: jax.Array, scale: float = 3.0) -> jax.Array:
    """z = clip(z̄ / scale, −1, 1) [paper]: the DPD's target range."""
    return jnp.clip(z_bar / scale, -1.0, 1.0)


def clip_fraction(z_bar: jax.Array, scale: float = 3.0) -> jax.Array:
    """Share of latent values that `map_latent` clips (the paper: < 0.1 % at scale 3)."""
    return jnp.mean(jnp.abs(z_bar / scale) > 1.0)


def pad_to_hop(audio: jax.Array, hop: int) -> jax.Array:
    """Zero-pads `[B, T]` at the end to `hop · ceil(T / hop)` samples."""
    extra = -audio.shape[-1] % hop
    return jnp.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(0, extra)]) if extra else audio


def encode(params: Any, audio: jax.Array, model: VAEGAN, *, with_stats: bool = False):
    """Audio `[B, T]` → z `[B, ceil(T / hop), latent]` in [-1, 1] (posterior mean, mapped).

    With `with_stats`, also `{"clip_fraction": ...}` for logging.
    """
    post = model.apply({"params": params}, pad_to_hop(jnp.asarray(audio, jnp.float32), model.hop),
                       method=VAEGAN.posterior)
    z = map_latent(post.mean, model.latent_scale)
    return (z, {"clip_fraction": clip_fraction(post.mean, model.latent_scale)}) if with_stats else z


def decode(params: Any, z: jax.Array, model: VAEGAN) -> jax.Array:
    """z `[B, L, latent]` (values outside [-1, 1] are clipped) → audio `[B, hop · L]`."""
    return model.apply({"params": params}, jnp.clip(z, -1.0, 1.0), method=VAEGAN.decode)


def build(model_config: Any) -> VAEGAN:
    """The generator from `config.model` (see configs/vae_gan.py)."""
    m, dtype = model_config, jnp.dtype(model_config.dtype)
    enc, dec = m.encoder, m.decoder
    return VAEGAN(
        Encoder(m.latent_dim, tuple(enc.rates), tuple(enc.channels), tuple(enc.kernels), enc.block,
                tuple(enc.mrf_kernels), tuple(enc.mrf_dilations), dtype),
        Decoder(tuple(dec.rates), tuple(dec.channels), tuple(dec.kernels), dec.block, tuple(dec.mrf_kernels),
                tuple(dec.mrf_dilations), dtype),
        m.latent_scale,
    )
