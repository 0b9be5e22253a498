"""The trained codec run frozen (MusicGen's tokenizer): audio ↔ codes, and the checks that a
MusicGen LM fits it.

Built from a stage directory (the generator and its codebook state only: the critic stays behind);
`variables` is what `models.codec.encode/decode` take, so a stage can pass them into its own jitted
step (`frozen.inputs.FrozenInputs`), plus jitted conveniences that bind them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from melody_jax.frozen.checks import need
from melody_jax.frozen.loader import KEEP, load_stage
from melody_jax.models import codec
from melody_jax.training.errors import BundleError
from melody_jax.training.sharding import Rules

MUSICGEN_STAGES = ("codec", "musicgen")


def audio_channels(musicgen_config: ml_collections.ConfigDict) -> int:
    """2 for a stereo MusicGen (codebooks [L0, R0, L1, R1, …], converted from musicgen-stereo-*), else 1."""
    return int(musicgen_config.get("hf", {}).get("audio_channels", 1))


def check_musicgen_fit(configs: Mapping[str, ml_collections.ConfigDict]) -> None:
    """One clear BundleError for the first way a codec and a MusicGen LM do not fit together."""
    missing = [s for s in MUSICGEN_STAGES if s not in configs]
    need(not missing, f"bundle lacks the stage(s) {', '.join(missing)}", BundleError)
    c, lm = configs["codec"], configs["musicgen"]
    q, m = c.model.quantizer, lm.model
    channels = audio_channels(lm)
    need((q.num_quantizers * channels, q.codebook_size) == (m.num_codebooks, m.codebook_size),
         f"codec has {q.num_quantizers} codebooks of {q.codebook_size} codes, musicgen models "
         f"{m.num_codebooks} of {m.codebook_size}" + (f" for {channels} channels" if channels > 1 else ""), BundleError)
    rate = c.data.sample_rate / math.prod(c.model.strides)
    need((rate, c.data.sample_rate) == (lm.data.frame_rate, lm.data.sample_rate),
         f"codec makes {rate:g} frames/s at {c.data.sample_rate} Hz, musicgen expects "
         f"{lm.data.frame_rate:g} at {lm.data.sample_rate} Hz", BundleError)


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenCodec:
    model: codec.Codec
    variables: dict[str, Any]  # {"params": generator, <codebook state collections>}
    config: ml_collections.ConfigDict  # the codec stage's

    @classmethod
    def load(cls, directory: str, mesh: jax.sharding.Mesh, rules: Rules, *, field: str = "codec") -> "FrozenCodec":
        stage = load_stage(directory, "codec", mesh, rules, field=field, keep=KEEP["codec"])
        return cls(stage.model, {"params": stage.params["generator"], **stage.params["generator_state"]}, stage.config)

    @property
    def sample_rate(self) -> int:
        return int(self.config.data.sample_rate)

    @property
    def hop(self) -> int:
        return self.model.hop

    def encode_fn(self, variables: dict[str, Any], audio: jax.Array) -> jax.Array:
        """Audio `[B, T]` → codes `int32 [B, n_q, ceil(T / hop)]` (pure: for use inside jitted steps)."""
        return codec.encode(variables, audio, self.model)

    @functools.cached_property
    def _jitted(self) -> dict[str, Any]:
        return {"encode": jax.jit(self.encode_fn),
                "decode": jax.jit(lambda variables, codes: codec.decode(variables, codes, self.model))}

    def encode(self, audio: jax.Array) -> jax.Array:
        return self._jitted["encode"](self.variables, audio)

    def decode(self, codes: jax.Array) -> jax.Array:
        """`int [B, n_q, L]` → `[B, L · hop]`."""
        return self._jitted["decode"](self.variables, codes)
