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
    """A layout of K codebooks over T ≥ 1 frames; subclasses define `_layout` and `num_steps`."""

    num_codebooks: int

    @abc.abstractmethod
    def _layout(self, num_timesteps: int) -> np.ndarray:
        """`int [K, T]`: the step at which code `(k, t)` is predicted."""

    @abc.abstractmethod
    def num_steps(self, num_timesteps: int) -> int:
        """Sequence length S for T frames."""

    def max_timesteps(self, num_steps: int) -> int:
        """The largest T whose layout fits in `num_steps` steps (every frame adds ≥ 1 step: bisect [0, S])."""
        low, high = 0, num_steps
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.num_steps(mid) <= num_steps else (low, mid - 1)
        return low

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


def _ints(name: str, values: Sequence[int] | None, length: int, default: Sequence[int]) -> tuple[int, ...]:
    """`values` (or `default`) as a tuple of `length` non-negative ints; ValueError otherwise."""
    out = tuple(default) if values is None else tuple(int(v) for v in values)
    if len(out) != length or (out and min(out) < 0):
        raise ValueError(f"{name} must be {length} non-negative ints, got {values}")
    return out


@dataclasses.dataclass(frozen=True)
class DelayPattern(Pattern):
    """Codebook k shifted right by `delays[k]` steps (MusicGen's default, delays [0, 1, 2, 3]).

    S = T + max(delays). (k, t) sees exactly {(k2, t2) : t2 + d[k2] < t + d[k]}: with increasing
    delays, a finer codebook sees coarser ones up to frame t + d[k] − d[k2] − 1 ≥ t (its own frame
    included), a coarser one sees finer ones only up to t − (d[k2] − d[k]) − 1.

    audiocraft's two extras: `empty_initial` E empty steps first, then the first `flatten_first` F
    frames flattened one code per step ((k, t) at E + t·K + k), the rest delayed after them ((k, t ≥ F)
    at E + K·F + t + d[k] − F). S = E + K·min(T, F) + max(T + max(d) − F, 0). Then (k, t) sees: for
    t, t2 < F, (t2, k2) < (t, k) in order; every flattened frame when t ≥ F; for t, t2 ≥ F, the delayed
    rule above; nothing of t2 ≥ F when t < F.
    """

    num_codebooks: int
    delays: tuple[int, ...] | None = None
    flatten_first: int = 0
    empty_initial: int = 0

    def __post_init__(self):
        object.__setattr__(self, "delays", _ints("delays", self.delays, self.num_codebooks, range(self.num_codebooks)))
        if min(self.flatten_first, self.empty_initial) < 0:
            raise ValueError(f"flatten_first={self.flatten_first} and empty_initial={self.empty_initial} must be >= 0")

    def _layout(self, num_timesteps: int) -> np.ndarray:
        k, first, frames = self.num_codebooks, self.flatten_first, np.arange(num_timesteps)[None, :]
        flat = frames * k + np.arange(k)[:, None]
        delayed = k * min(num_timesteps, first) + frames - first + np.asarray(self.delays)[:, None]
        return self.empty_initial + np.where(frames < first, flat, delayed)

    def num_steps(self, num_timesteps: int) -> int:
        first = self.flatten_first
        delayed = max(num_timesteps + max(self.delays) - first, 0)
        return self.empty_initial + self.num_codebooks * min(num_timesteps, first) + delayed


@dataclasses.dataclass(frozen=True)
class UnrollPattern(Pattern):
    """Flattened: code (k, t) alone at step t·K + k; S = K·T (fully autoregressive, K× the steps).

    (k, t) sees exactly {(k2, t2) : t2 < t} ∪ {(k2, t) : k2 < k}: all earlier frames and the
    coarser codebooks of its own frame.

    audiocraft's partial flattening: codebook k goes to inner step `flattening[k]` (non-decreasing;
    codebooks sharing one are predicted together) of the n = max(flattening) + 1 inner steps of each
    frame, and inner step i is delayed by `delays[k]` frames (equal within an inner step). Slots are
    ordered by (t + d, t, i) — an inner step holding no codebook is an empty slot of frame t ordered by
    (t, first) — for t < T + max(d), a delayed slot kept while t + d < T + max(d); so
    S = n·(T + max(d)) − Σ over used inner steps of their delay. (k, t) sees exactly the (k2, t2) with
    (t2 + d[k2], t2, f[k2]) < (t + d[k], t, f[k]).
    """

    num_codebooks: int
    flattening: tuple[int, ...] | None = None
    delays: tuple[int, ...] | None = None

    def __post_init__(self):
        k = self.num_codebooks
        flattening = _ints("flattening", self.flattening, k, range(k))
        delays = _ints("delays", self.delays, k, (0,) * k)
        if list(flattening) != sorted(flattening):
            raise ValueError(f"flattening must be non-decreasing, got {flattening}")
        if len({(f, d) for f, d in zip(flattening, delays)}) != len(set(flattening)):
            raise ValueError(f"codebooks flattened to one inner step need one delay: {flattening}, {delays}")
        object.__setattr__(self, "flattening", flattening)
        object.__setattr__(self, "delays", delays)

    def _inner(self) -> tuple[np.ndarray, np.ndarray]:
        """(delay, used) per inner step: an inner step holding no codebook is an empty slot, delay 0."""
        inner = max(self.flattening) + 1
        delay, used = np.zeros(inner, int), np.zeros(inner, bool)
        delay[list(self.flattening)], used[list(self.flattening)] = self.delays, True
        return delay, used

    def _layout(self, num_timesteps: int) -> np.ndarray:
        delay, used = self._inner()
        span = num_timesteps + max(self.delays)
        frames, steps = np.meshgrid(np.arange(span), np.arange(delay.size), indexing="ij")
        keys = frames + delay[steps]
        keep = ~used[steps] | (keys < span)
        order = np.lexsort((steps[keep], frames[keep], used[steps][keep], keys[keep]))  # last key sorts first
        position = np.full(frames.shape, -1)
        position[frames[keep][order], steps[keep][order]] = np.arange(order.size)
        return position[np.arange(num_timesteps)[None, :], np.asarray(self.flattening)[:, None]]

    def num_steps(self, num_timesteps: int) -> int:
        delay, used = self._inner()
        return delay.size * (num_timesteps + max(self.delays)) - int(delay[used].sum())
@dataclasses.dataclass(frozen=True)
class CoarseFirstPattern(Pattern):
    """VALL-E-like: codebook 0 alone for T steps, then codebooks 1…K−1 with `delays` (K−1 of them, default 0).

    (0, t) at step t, (k ≥ 1, t) at T + t + d[k−1]; S = 2T + max(d) (T if K = 1). (0, t) sees exactly
    {(0, t2) : t2 < t}; (k ≥ 1, t) sees all of codebook 0 (every frame, past and future) and
    {(k2 ≥ 1, t2) : t2 + d[k2−1] < t + d[k−1]}.
    """

    num_codebooks: int
    delays: tuple[int, ...] | None = None

    def __post_init__(self):
        fine = self.num_codebooks - 1
        object.__setattr__(self, "delays", _ints("delays", self.delays, fine, (0,) * fine))

    def _layout(self, num_timesteps: int) -> np.ndarray:
        frames = np.arange(num_timesteps)
        fine = num_timesteps + frames[None, :] + np.asarray(self.delays, int).reshape(-1, 1)
        return np.concatenate([frames[None, :], fine], axis=0)

    def num_steps(self, num_timesteps: int) -> int:
        return num_timesteps + (num_timesteps + max(self.delays) if self.delays else 0)


@dataclasses.dataclass(frozen=True)
class MusicLMPattern(Pattern):
    """audiocraft's "musiclm": codebooks in groups of `group_by`, each group flattened over all T frames in turn.

    (k, t) is alone at step (k // g)·g·T + t·g + k mod g; S = K·T. (k, t) sees every code of an
    earlier group, and in its own group {(k2, t2) : t2 < t} ∪ {(k2, t) : k2 < k}.
    """

    num_codebooks: int
    group_by: int = 2

    def __post_init__(self):
        if self.group_by < 1 or self.num_codebooks % self.group_by:
            raise ValueError(f"group_by={self.group_by} must divide num_codebooks={self.num_codebooks}")

    def _layout(self, num_timesteps: int) -> np.ndarray:
        g, books = self.group_by, np.arange(self.num_codebooks)[:, None]
        return (books // g) * g * num_timesteps + np.arange(num_timesteps)[None, :] * g + books % g

    def num_steps(self, num_timesteps: int) -> int:
        return num_timesteps * self.num_codebooks


PATTERNS = {
    "parallel": ParallelPattern,
    "delay": DelayPattern,
    "unroll": UnrollPattern,
    "coarse_first": CoarseFirstPattern,
    "musiclm": MusicLMPattern,
}


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def make_pattern(name: str, num_codebooks: int, delays: Sequence[int] | None = None, **options) -> Pattern:
    """Pattern by config name; `delays` and `options` (None = default) only where the pattern has them.

    delay: delays (K; default 0…K−1), flatten_first, empty_initial; unroll: flattening, delays (K);
    coarse_first: delays (K − 1, one per fine codebook); musiclm: group_by (default 2).
    """
    if name not in PATTERNS:
        raise ValueError(f"unknown codebook pattern {name!r}; choose from {sorted(PATTERNS)}")
    if num_codebooks < 1:
        raise ValueError(f"num_codebooks must be >= 1, got {num_codebooks}")
    given = {k: v for k, v in {"delays": delays, **options}.items() if v is not None}
    for key, value in given.items():
        owners = [n for n, cls in PATTERNS.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if name not in owners or key == "num_codebooks":
            raise ValueError(f"{key} is only meaningful for the {owners} patterns, not {name!r}")
        listed = key in ("delays", "flattening")
        if listed and isinstance(value, (list, tuple)) and all(_is_int(v) for v in value):
            given[key] = tuple(int(v) for v in value)
        elif listed or not _is_int(value):
            raise ValueError(f"{key} must be {'a list of ints' if listed else 'an int'}, got {value!r}")
    return PATTERNS[name](num_codebooks, **given)
