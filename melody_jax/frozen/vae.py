"""The trained VAE-GAN run frozen: 24 kHz audio ↔ mapped latents in [-1, 1] (DESIGN §4.1).

Built from a stage directory (`frozen.loader.load_stage`, the generator only: the critic stays
behind); pure, traceable `encode_fn` for use inside another stage's jitted step, plus jitted
conveniences that bind the parameters.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from melody_jax.frozen.loader import KEEP, load_stage
from melody_jax.models import vae_gan
from melody_jax.training.sharding import Rules


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenVAE:
    model: vae_gan.VAEGAN
    params: Any  # the generator's
    config: ml_collections.ConfigDict  # the vae_gan stage's

    @classmethod
    def load(cls, directory: str, mesh: jax.sharding.Mesh, rules: Rules, *, field: str = "vae_gan") -> "FrozenVAE":
        stage = load_stage(directory, "vae_gan", mesh, rules, field=field, keep=KEEP["vae_gan"])
        return cls(stage.model, stage.params["generator"], stage.config)

    @property
    def sample_rate(self) -> int:
        return int(self.config.data.sample_rate)

    @property
    def latent_dim(self) -> int:
        return int(self.config.model.latent_dim)

    @property
    def hop(self) -> int:
        return self.model.hop

    def encode_fn(self, params: Any, audio: jax.Array) -> jax.Array:
        return vae_gan.encode(params, audio, self.model)

    @functools.cached_property
    def _encode(self):
        return jax.jit(self.encode_fn)

    @functools.cached_property
    def _decode(self):
        return jax.jit(lambda p, z: vae_gan.decode(p, z, self.model))

    def encode(self, audio: jax.Array) -> jax.Array:
        """[B, T] → [B, ceil(T / hop), latent]."""
        return self._encode(self.params, jnp.asarray(audio, jnp.float32))

    def decode(self, z: jax.Array) -> jax.Array:
        """[B, L, latent] → [B, hop · L]."""
        return self._decode(self.params, jnp.asarray(z, jnp.float32))
