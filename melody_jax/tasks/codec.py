"""Codec stage (DESIGN §6, §7): MusicGen's RVQ codec trained with the shared GAN step.

Generator loss (audiocraft's compression solver weights): 0.1·L1(waveform) + 2·multi-scale mel
(melody_jax/audio/losses.py) + 1·commitment, plus the GAN step's adversarial and feature-matching
terms (4 and 4). Codebooks update by EMA inside the step (`generator_state`), never by gradients.
Logged: per-level codebook perplexity and usage, re-seeded dead codes. Evaluation: the held-out
crops through the full RVQ, scored by multi-scale mel distance (`eval_loss`), MR-STFT and SI-SNR.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from melody_jax.audio.losses import STFTResolution, multi_scale_mel_loss
from melody_jax.audio.metrics import mr_stft_distance, si_snr
from melody_jax.models import codec
from melody_jax.nn.quantizers import VQ_COLLECTION, VQ_RNG
from melody_jax.frozen.stage_models import build_model
from melody_jax.tasks.gan import GANTask
from melody_jax.training.config import non_negative, positive, require
from melody_jax.training.task import Batch, Metrics

# Spectral distance for evaluation at 32 kHz (n_fft, hop, win), audiocraft's MR-STFT-style scales.
EVAL_STFT = (STFTResolution(2048, 512, 2048), STFTResolution(1024, 256, 1024), STFTResolution(512, 128, 512),
             STFTResolution(256, 64, 256), STFTResolution(128, 32, 128))


class CodecTask(GANTask):
    name = "codec"
    generator_state_collections = (VQ_COLLECTION,)
    balanced_loss_names = ("l1", "mel")

    def validate(self) -> None:
        c = self.config
        self.validate_gan()
        positive(c, "model.channels", "model.latent_dim", "model.quantizer.num_quantizers",
                 "model.quantizer.codebook_size", "data.sample_rate", "data.crop_seconds")
        non_negative(c, "loss.l1", "loss.mel", "loss.commitment", "loss.adversarial", "loss.feature_matching")
        hop = math.prod(c.model.strides)
        require(self.crop_samples() % hop == 0, f"config.data.crop_seconds={c.data.crop_seconds} gives "
                f"{self.crop_samples()} samples, not a multiple of the hop {hop}")
        require(c.model.dtype in ("float32", "bfloat16"), f"config.model.dtype={c.model.dtype!r} must be float32 "
                "or bfloat16")

    @property
    def model(self) -> codec.Codec:
        return build_model(self.config).module

    def init_generator(self, rng: jax.Array) -> dict[str, Any]:
        return self.model.init(rng, jnp.zeros((1, self.crop_samples())))

    def reconstruct(self, params, state, batch: Batch, rng, train: bool):
        real = batch["audio"]
        variables = {"params": params, **state}
        if train:
            (fake, q), new_state = self.model.apply(variables, real, update=True, mutable=[VQ_COLLECTION],
                                                    rngs={VQ_RNG: rng})
        else:
            (fake, q), new_state = self.model.apply(variables, real), state
        w = self.config.loss
        parts = self.balanced_losses(fake, real)
        rec = w.commitment * q.commitment_loss  # with the balancer on, it weighs l1 and mel in the step
        if not self.balancing:
            rec = w.l1 * parts["l1"] + w.mel * parts["mel"] + rec
        metrics = {**parts, "commitment": q.commitment_loss, "perplexity": jnp.mean(q.perplexity),
                   "codebook_usage": jnp.mean(q.usage), "dead_codes": jnp.sum(q.dead_codes)}
        metrics.update({f"perplexity_{i}": q.perplexity[i] for i in range(q.perplexity.shape[0])})
        return fake, real, rec, metrics, dict(new_state)

    def balanced_losses(self, fake: jax.Array, real: jax.Array) -> dict[str, jax.Array]:
        return {"l1": jnp.mean(jnp.abs(fake - real)),
                "mel": multi_scale_mel_loss(fake, real, self.config.data.sample_rate)}

    def eval_step(self, params: Any, batch: Batch, rng: jax.Array) -> Metrics:
        real = batch["audio"]
        fake, q = self.model.apply({"params": params["generator"], **params["generator_state"]}, real)
        mel = multi_scale_mel_loss(fake, real, self.config.data.sample_rate)
        return {"loss": mel, "mr_stft": mr_stft_distance(fake, real, EVAL_STFT),
                "si_snr_db": jnp.mean(si_snr(fake, real)), "perplexity": jnp.mean(q.perplexity)}
