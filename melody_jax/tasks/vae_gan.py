"""VAE-GAN stage (DESIGN §4.1, §7): 50·MR-STFT + 20·feature matching + 1·LSGAN + 5e-3·KL
(+ `loss.log_mel` · HiFi-GAN's log-mel L1, 0 in every preset).

Data: random crops of a prepared dataset (`config.data.path`) at 24 kHz; evaluation: the
`data.eval_split` crops reconstructed from the posterior mean, scored by MR-STFT distance (the
`eval_loss`), log-mel L1 and SI-SNR. A trained generator runs frozen as `frozen.vae.FrozenVAE`.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from melody_jax.audio.losses import mr_stft_l1, resolutions
from melody_jax.audio.metrics import log_mel_distance, reconstruction_metrics
from melody_jax.frozen.stage_models import build_model
from melody_jax.models import vae_gan
from melody_jax.tasks.gan import GANTask
from melody_jax.training.config import non_negative, positive, require
from melody_jax.training.errors import ConfigError
from melody_jax.training.task import Batch, Metrics


class VAEGANTask(GANTask):
    name = "vae_gan"

    def validate(self) -> None:
        c = self.config
        m, d = c.model, c.data
        self.validate_gan()
        positive(c, "model.latent_dim", "model.latent_scale", "data.sample_rate", "data.crop_seconds")
        non_negative(c, "loss.mr_stft", "loss.feature_matching", "loss.adversarial", "loss.kl", "loss.log_mel")
        for part in ("encoder", "decoder"):
            p = m[part]
            require(len(p.rates) == len(p.channels) == len(p.kernels),
                    f"config.model.{part}: rates, channels and kernels differ in length")
            require(p.block in (1, 2), f"config.model.{part}.block={p.block} must be 1 or 2")
            require(all(isinstance(v, int) and v > 0 for v in [*p.rates, *p.channels, *p.kernels]),
                    f"config.model.{part}: rates, channels and kernels must be positive ints")
        hop = math.prod(m.encoder.rates)
        require(math.prod(m.decoder.rates) == hop, f"config.model.decoder.rates={list(m.decoder.rates)} must "
                f"multiply to the encoder's hop {hop}")
        require(self.crop_samples() % hop == 0, f"config.data.crop_seconds={d.crop_seconds} gives "
                f"{self.crop_samples()} samples, not a multiple of the hop {hop}")
        try:
            res = self.stft_resolutions
        except ValueError as e:
            raise ConfigError(f"config.loss.stft_*: {e}") from None
        longest = max([r.n_fft for r in res] + [r[0] for r in c.discriminator.spectrogram_resolutions])
        require(self.crop_samples() > longest // 2, f"config.data.crop_seconds={d.crop_seconds} is too short for "
                f"an n_fft of {longest} (reflect padding needs more than {longest // 2} samples)")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")

    @property
    def model(self) -> vae_gan.VAEGAN:
        return build_model(self.config).module

    @property
    def stft_resolutions(self):
        w = self.config.loss
        return resolutions(w.stft_n_ffts, w.stft_hops, w.stft_wins)

    def init_generator(self, rng: jax.Array) -> dict[str, Any]:
        return self.model.init(rng, jnp.zeros((1, self.crop_samples())))

    def reconstruct(self, params, state, batch: Batch, rng, train: bool):
        real = batch["audio"]
        model = self.model
        fake, post, _ = model.apply({"params": params}, real, rng if train else None)
        mr_stft = mr_stft_l1(fake, real, self.stft_resolutions)
        kl = post.kl(self.config.loss.reduction)
        w = self.config.loss
        metrics = {"mr_stft": mr_stft, "kl": kl,
                   "clip_fraction": vae_gan.clip_fraction(post.mean, model.latent_scale),
                   "posterior_std": jnp.mean(jnp.exp(0.5 * post.logvar))}
        loss = w.mr_stft * mr_stft + w.kl * kl
        if w.log_mel:
            metrics["log_mel_l1"] = log_mel_distance(fake, real, self.config.data.sample_rate)
            loss = loss + w.log_mel * metrics["log_mel_l1"]
        return fake, real, loss, metrics, None

    def eval_step(self, params: Any, batch: Batch, rng: jax.Array) -> Metrics:
        real = batch["audio"]
        fake, post, _ = self.model.apply({"params": params["generator"]}, real, None)
        metrics = reconstruction_metrics(fake, real, self.config.data.sample_rate, self.stft_resolutions)
        return {**metrics, "loss": metrics["mr_stft"],
                "clip_fraction": vae_gan.clip_fraction(post.mean, self.model.latent_scale)}
