"""GAN discriminators shared by the VAE-GAN (§4.1) and the MusicGen codec (§6).

Each sub-discriminator returns `(logits, feature_maps)`; a `Discriminators` bundle returns one such
pair per sub-discriminator, which is all the GAN losses in melody_jax/tasks/gan.py need.
- Multi-period (HiFi-GAN): the waveform folded to `[T / p, p]`, 2-D convs along time only.
- Multi-resolution spectrogram (UnivNet): 2-D convs over a linear magnitude spectrogram.
- Multi-scale STFT (EnCodec/audiocraft): 2-D convs over the complex STFT (real, imaginary as
  channels), dilated along time.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.audio.stft import magnitude, stft
from melody_jax.nn.conv import LRELU_SLOPE, Conv

Output = tuple[jax.Array, list[jax.Array]]  # (logits, feature maps)


def _constrain(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, ("batch", None, None, None))


class PeriodDiscriminator(nn.Module):
    period: int
    channels: Sequence[int] = (32, 128, 512, 1024, 1024)
    kernel: int = 5
    stride: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> Output:
        b, t = audio.shape
        extra = -t % self.period
        if extra:
            audio = jnp.pad(audio, ((0, 0), (0, extra)), mode="reflect")
        x = audio.reshape(b, -1, self.period, 1).astype(self.dtype)
        features = []
        pad = ((self.kernel - 1) // 2, self.kernel - 1 - (self.kernel - 1) // 2)
        for i, ch in enumerate(self.channels):
            stride = self.stride if i < len(self.channels) - 1 else 1
            x = Conv(ch, (self.kernel, 1), (stride, 1), (pad, (0, 0)), dtype=self.dtype)(x)
            x = _constrain(nn.leaky_relu(x, LRELU_SLOPE))
            features.append(x)
        x = Conv(1, (3, 1), padding=((1, 1), (0, 0)), dtype=self.dtype)(x)
        features.append(x)
        return x.reshape(b, -1).astype(jnp.float32), features


class SpectrogramDiscriminator(nn.Module):
    """UnivNet's MRD at one (n_fft, hop, win): convs (3, 9), 3 × (3, 9) stride (1, 2), (3, 3)."""

    n_fft: int
    hop_length: int
    win_length: int
    channels: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> Output:
        x = magnitude(stft(audio, self.n_fft, self.hop_length, self.win_length))[..., None].astype(self.dtype)
        layers = [((3, 9), (1, 1)), ((3, 9), (1, 2)), ((3, 9), (1, 2)), ((3, 9), (1, 2)), ((3, 3), (1, 1))]
        features = []
        for kernel, strides in layers:
            pad = tuple(((k - 1) // 2, (k - 1) - (k - 1) // 2) for k in kernel)
            x = Conv(self.channels, kernel, strides, pad, dtype=self.dtype)(x)
            x = _constrain(nn.leaky_relu(x, LRELU_SLOPE))
            features.append(x)
        x = Conv(1, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)(x)
        features.append(x)
        return x.reshape(x.shape[0], -1).astype(jnp.float32), features


class STFTDiscriminator(nn.Module):
    """EnCodec's MS-STFT sub-discriminator: complex STFT as 2 channels, time dilations 1, 2, 4.

    LeakyReLU slope 0.2 (the class default in audiocraft); its 32-kHz MusicGen codec config uses 0.3.
    """

    n_fft: int
    hop_length: int
    win_length: int
    channels: int = 32
    dilations: Sequence[int] = (1, 2, 4)
    negative_slope: float = 0.2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, audio: jax.Array) -> Output:
        slope = self.negative_slope
        spec = stft(audio, self.n_fft, self.hop_length, self.win_length)
        x = jnp.stack([jnp.real(spec), jnp.imag(spec)], axis=-1).astype(self.dtype)
        x = Conv(self.channels, (3, 9), padding=((1, 1), (4, 4)), dtype=self.dtype)(x)
        features = [x]
        for d in self.dilations:
            x = Conv(self.channels, (3, 9), (1, 2), ((d, d), (4, 4)), dilation=(d, 1), dtype=self.dtype)(
                nn.leaky_relu(x, slope))
            features.append(_constrain(x))
        x = Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)(nn.leaky_relu(x, slope))
        features.append(x)
        x = Conv(1, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype)(nn.leaky_relu(x, slope))
        return x.reshape(x.shape[0], -1).astype(jnp.float32), features


class Discriminators(nn.Module):
    """Any mix of the three kinds; empty lists switch a kind off. Returns one Output per member."""

    periods: Sequence[int] = (2, 3, 5, 7, 11)
    period_channels: Sequence[int] = (32, 128, 512, 1024, 1024)
    spectrogram_resolutions: Sequence[Sequence[int]] = ((1024, 120, 600), (2048, 240, 1200), (512, 50, 240))
    spectrogram_channels: int = 32
    stft_resolutions: Sequence[Sequence[int]] = ()
    stft_channels: int = 32
    dtype: jnp.dtype = jnp.float32
    stft_negative_slope: float = 0.2

    @nn.compact
    def __call__(self, audio: jax.Array) -> list[Output]:
        audio = jnp.asarray(audio, jnp.float32)
        outs = [PeriodDiscriminator(p, tuple(self.period_channels), dtype=self.dtype, name=f"mpd_{p}")(audio)
                for p in self.periods]
        outs += [SpectrogramDiscriminator(*r, channels=self.spectrogram_channels, dtype=self.dtype,
                                          name=f"mrd_{r[0]}")(audio) for r in self.spectrogram_resolutions]
        outs += [STFTDiscriminator(*r, channels=self.stft_channels, negative_slope=self.stft_negative_slope,
                                   dtype=self.dtype, name=f"msstft_{r[0]}")(audio) for r in self.stft_resolutions]
        return outs


def build(disc_config) -> Discriminators:
    """From `config.discriminator` (shared by configs/vae_gan.py and configs/codec.py)."""
    d = disc_config
    as_tuples = lambda rs: tuple(tuple(int(v) for v in r) for r in rs)  # noqa: E731
    return Discriminators(tuple(d.periods), tuple(d.period_channels), as_tuples(d.spectrogram_resolutions),
                          d.spectrogram_channels, as_tuples(d.stft_resolutions), d.stft_channels,
                          jnp.dtype(d.dtype), float(d.get("stft_negative_slope", 0.2)))
