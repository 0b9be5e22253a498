"""What every text-to-music system offers, MeLoDy and MusicGen alike: audiocraft's `generate*` verbs.

`launch.evaluate`, `launch.sample`, the app and the benchmarks call a `Generator` and need not know
which system a bundle holds (`pipelines.load.load_pipeline` picks it). Sampling arguments a call
leaves out (None) take the bundle's `config.sample` (`defaults`), so no caller writes a CFG scale,
a step count or a schedule of its own.
"""
from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from melody_jax.training.errors import UserError


class AudioInputError(UserError, ValueError):
    """Given audio (continuation, inpainting, prompting) or arguments cannot be used as asked."""


@dataclasses.dataclass
class Result:
    """One batch of generated music and how it was made."""

    audio: np.ndarray  # float32 [B, T] (stereo [B, T, 2]) at sample_rate
    sample_rate: int
    seconds: dict[str, float]  # wall time per stage (compilation included on first use)
    forward_passes: dict[str, int]  # network evaluations per stage, per batch
    latents: np.ndarray | None = None  # MeLoDy: [B, L, 16] mapped VAE latents
    semantic_tokens: np.ndarray | None = None  # MeLoDy: int32 [B, N]
    mulan_tokens: np.ndarray | None = None  # MeLoDy: int32 [B, Q]
    codes: np.ndarray | None = None  # MusicGen: int32 [B, K, frames] codec codes

    @property
    def real_time_factor(self) -> float:
        """Audio seconds generated per wall second (> 1: faster than real time), whole batch."""
        return self.audio.shape[0] * self.audio.shape[1] / self.sample_rate / max(sum(self.seconds.values()), 1e-9)


class Generator(abc.ABC):
    """A loaded bundle; the same seed gives the same audio. `**sampling` are the names in
    `defaults`, besides `duration` (MeLoDy: steps, cfg, schedule, temperature, top_k, top_p, lm_cfg;
    MusicGen: cfg, temperature, top_k, top_p, cfg_beta, two_step_cfg)."""

    name: str  # "melody" | "musicgen": the bundle's kind
    sample_rate: int
    defaults: dict[str, Any]  # the bundle's config.sample under the call's names; fields it lacks at their defaults
    mulan: Any = None  # a MuLan that embeds this system's audio and text (MeLoDy's own), for evaluation

    def settings(self, duration_s: float | None = None, **sampling: Any) -> dict[str, Any]:
        """`defaults` with the duration and every sampling argument given (not None) in their places;
        a name this system does not take is an error unless its value is None."""
        names = [k for k in self.defaults if k != "duration"]
        unknown = sorted(k for k, v in sampling.items() if v is not None and k not in names)
        if unknown:
            raise AudioInputError(f"{self.name} takes no sampling argument {', '.join(unknown)} (it takes "
                                  f"{', '.join(names)})")
        given = {"duration": duration_s, **sampling}
        return {k: v if given.get(k) is None else given[k] for k, v in self.defaults.items()}

    @abc.abstractmethod
    def generate(self, prompts: Sequence[str], duration_s: float | None = None, seed: int = 0,
                 **sampling: Any) -> Result:
        """Text → `duration_s` seconds of music for each prompt."""

    @abc.abstractmethod
    def generate_continuation(self, audio: np.ndarray, duration_s: float | None = None,
                              prompts: Sequence[str] | None = None, seed: int = 0, **sampling: Any) -> Result:
        """`audio` followed by `duration_s` new seconds, prompted by `prompts` (None: each system's own rule)."""

    def generate_unconditional(self, num_samples: int, duration_s: float | None = None, seed: int = 0,
                               **sampling: Any) -> Result:
        """Music from no condition at all, where the system has a null condition."""
        raise AudioInputError(f"{self.name} has no unconditional mode")
