"""Codebook interleaving patterns for the MusicGen LM (§6), after audiocraft's `CodebooksPatternProvider`.

A codec gives K codebooks × T frames of codes `(k, t)`. A pattern lays them out as a sequence of
S steps; at step s the LM predicts, in parallel, every code placed at s, having seen every code
placed at steps < s. A layout is the table `step_of[k, t]` (each code in exactly one step, each
codebook at most once per step, a codebook's codes in time order). Sequences are `[B, K, S]`: row
k at step s holds the code of codebook k placed at s, or `special_token` where there is none.

Visibility — what the model has seen when it predicts `(k, t)` — is
`{(k2, t2) : step_of[k2, t2] < step_of[k, t]}`; `visibility()` computes it from the table, and each
pattern's docstring states it in closed form (the tests check one against the other).

Unlike audiocraft there is no leading empty step: the LM shifts the sequence right itself.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


class Pattern(abc.ABC):
    """A layout of K codebooks over T ≥ 1 frames; subclasses define `_layout`, `num_steps`, `max_timesteps`."""

    num_codebooks: int

    @abc.abstractmethod
    def _layout(self, num_timesteps: int) -> np.ndarray:
        """`int [K, T]`: the step at which code `(k, t)` is predicted."""

    @abc.abstractmethod
    def num_steps(self, num_timesteps: int) -> int:
        """Sequence length S for T frames."""

    @abc.abstractmethod
    def max_timesteps(self, num_steps: int) -> int:
        """The largest T whose layout fits in `num_steps` steps."""

    def step_of(self, num_timesteps: int) -> np.ndarray:
        """Validated, cached, read-only `int32 [K, T]` step table."""
        return _tables(self, num_timesteps)[0]

    def time_of(self, num_timesteps: int) -> np.ndarray:
        """`int32 [K, S]`: the frame of codebook k placed at step s, or -1 (a special token)."""
        return _tables(self, num_timesteps)[1]

    def build(self, codes: jax.Array, special_token: int) -> jax.Array:
        """`int [B, K, T]` codes → `[B, K, S]` sequence, `special_token` in the empty slots."""
        return _build(self, jnp.asarray(codes), special_token)

    def revert(self, seq: jax.Array, num_timesteps: int | None = None) -> tuple[jax.Array, np.ndarray]:
        """`[B, K, S, ...]` → (`[B, K, T, ...]`, valid `bool [K, T]`).

        Trailing axes ride along, so logits `[B, K, S, V]` revert to `[B, K, T, V]`. With
        `num_timesteps` given, `seq` may be a prefix (S < num_steps(T), e.g. during sampling):
        frames whose step is not in it are marked invalid and zero-filled.
        """
        num_timesteps = self.max_timesteps(seq.shape[2]) if num_timesteps is None else num_timesteps
        return _revert(self, jnp.asarray(seq), num_timesteps), self.step_of(num_timesteps) < seq.shape[2]


# Jitted with the (hashable) pattern static, so the index tables become constants and eager calls
# compile one fused program per shape instead of one per primitive.
@functools.partial(jax.jit, static_argnums=0)
def _build(pattern: Pattern, codes: jax.Array, special_token: jax.Array) -> jax.Array:
    time_of = pattern.time_of(codes.shape[-1])
    rows = np.arange(pattern.num_codebooks)[:, None]
    seq = codes[:, rows, np.maximum(time_of, 0)]
    return jnp.where(time_of >= 0, seq, jnp.asarray(special_token, seq.dtype))


@functools.partial(jax.jit, static_argnums=(0, 2))
def _revert(pattern: Pattern, seq: jax.Array, num_timesteps: int) -> jax.Array:
    steps = seq.shape[2]
    step_of = pattern.step_of(num_timesteps)
    rows = np.arange(pattern.num_codebooks)[:, None]
    out = seq[:, rows, np.minimum(step_of, steps - 1)]
    valid = (step_of < steps).reshape((1,) + step_of.shape + (1,) * (out.ndim - 3))
    return jnp.where(valid, out, jnp.zeros((), out.dtype))


@functools.lru_cache(maxsize=256)
def _tables(pattern: Pattern, num_timesteps: int) -> tuple[np.ndarray, np.ndarray]:
    step_of = np.asarray(pattern._layout(num_timesteps), np.int32)
    num_k, steps = pattern.num_codebooks, pattern.num_steps(num_timesteps)
    if step_of.shape != (num_k, num_timesteps):
        raise ValueError(f"{pattern}: layout shape {step_of.shape} != {(num_k, num_timesteps)}")
    if num_timesteps and (step_of.min() < 0 or step_of.max() >= steps):
        raise ValueError(f"{pattern}: steps outside [0, {steps})")
    if (np.diff(step_of, axis=1) <= 0).any():
        raise ValueError(f"{pattern}: a codebook's codes are not in strictly increasing steps")
    time_of = np.full((num_k, steps), -1, np.int32)
    rows = np.broadcast_to(np.arange(num_k)[:, None], step_of.shape)
    time_of[rows, step_of] = np.broadcast_to(np.arange(num_timesteps), step_of.shape)
    for table in (step_of, time_of):
        table.setflags(write=False)
    return step_of, time_of


def visibility(pattern: Pattern, num_timesteps: int) -> np.ndarray:
    """`bool [K, T, K, T]`: `[k, t, k2, t2]` is whether code (k2, t2) precedes (k, t)'s step."""
    step_of = pattern.step_of(num_timesteps)
    return step_of[None, None, :, :] < step_of[:, :, None, None]


@dataclasses.dataclass(frozen=True)
class ParallelPattern(Pattern):
    """All codebooks of frame t at step t; S = T.

    (k, t) sees exactly {(k2, t2) : t2 < t}: every codebook of every earlier frame, nothing of its own.
    """

    num_codebooks: int

    def _layout(self, num_timesteps: int) -> np.ndarray:
        return np.broadcast_to(np.arange(num_timesteps), (self.num_codebooks, num_timesteps))

    def num_steps(self, num_timesteps: int) -> int:
        return num_timesteps

    def max_timesteps(self, num_steps: int) -> int:
        return num_steps


@dataclasses.dataclass(frozen=True)
class DelayPattern(Pattern):
    """Codebook k shifted right by `delays[k]` steps (MusicGen's default, delays [0, 1, 2, 3]).

    S = T + max(delays). (k, t) sees exactly {(k2, t2) : t2 + d[k2] < t + d[k]}: with increasing
    delays, a finer codebook sees coarser ones up to frame t + d[k] − d[k2] − 1 ≥ t (its own frame
    included), a coarser one sees finer ones only up to t − (d[k2] − d[k]) − 1.
    """

    num_codebooks: int
    delays: tuple[int, ...] | None = None

    def __post_init__(self):
        delays = tuple(range(self.num_codebooks)) if self.delays is None else tuple(int(d) for d in self.delays)
        if len(delays) != self.num_codebooks or min(delays) < 0:
            raise ValueError(f"delays must be {self.num_codebooks} non-negative ints, got {self.delays}")
        object.__setattr__(self, "delays", delays)

    def _layout(self, num_timesteps: int) -> np.ndarray:
        return np.arange(num_timesteps)[None, :] + np.asarray(self.delays)[:, None]

    def num_steps(self, num_timesteps: int) -> int:
        return num_timesteps + max(self.delays)

    def max_timesteps(self, num_steps: int) -> int:
        return max(num_steps - max(self.delays), 0)


@dataclasses.dataclass(frozen=True)
class UnrollPattern(Pattern):
    """Flattened: code (k, t) alone at step t·K + k; S = K·T (fully autoregressive, K× the steps).

    (k, t) sees exactly {(k2, t2) : t2 < t} ∪ {(k2, t) : k2 < k}: all earlier frames and the
    coarser codebooks of its own frame.
    """

    num_codebooks: int

    def _layout(self, num_timesteps: int) -> np.ndarray:
        return np.arange(num_timesteps)[None, :] * self.num_codebooks + np.arange(self.num_codebooks)[:, None]

    def num_steps(self, num_timesteps: int) -> int:
        return num_timesteps * self.num_codebooks

    def max_timesteps(self, num_steps: int) -> int:
        return num_steps // self.num_codebooks


@dataclasses.dataclass(frozen=True)
class CoarseFirstPattern(Pattern):
    """VALL-E-like: codebook 0 alone for T steps, then codebooks 1…K−1 of frame t together at step T + t.

    S = 2T (T if K = 1). (0, t) sees exactly {(0, t2) : t2 < t}; (k ≥ 1, t) sees all of codebook 0
    (every frame, past and future) and {(k2 ≥ 1, t2) : t2 < t}.
    """

    num_codebooks: int

    def _layout(self, num_timesteps: int) -> np.ndarray:
        frames = np.arange(num_timesteps)
        fine = np.broadcast_to(num_timesteps + frames, (self.num_codebooks - 1, num_timesteps))
        return np.concatenate([frames[None, :], fine], axis=0)

    def num_steps(self, num_timesteps: int) -> int:
        return num_timesteps * (2 if self.num_codebooks > 1 else 1)

    def max_timesteps(self, num_steps: int) -> int:
        return num_steps // (2 if self.num_codebooks > 1 else 1)


PATTERNS = {
    "parallel": ParallelPattern,
    "delay": DelayPattern,
    "unroll": UnrollPattern,
    "coarse_first": CoarseFirstPattern,
}


def make_pattern(name: str, num_codebooks: int, delays: Sequence[int] | None = None) -> Pattern:
    """Pattern by config name; `delays` only for 'delay' (default 0, 1, …, K−1)."""
    if name not in PATTERNS:
        raise ValueError(f"unknown codebook pattern {name!r}; choose from {sorted(PATTERNS)}")
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
    if name == "delay":
        return DelayPattern(num_codebooks, None if delays is None else tuple(delays))
    if delays is not None:
        raise ValueError(f"delays are only meaningful for the 'delay' pattern, not {name!r}")
    return PATTERNS[name](num_codebooks)
