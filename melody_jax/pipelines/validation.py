"""Checks on what a user hands the sampling pipelines (durations, prompts), before any compute.

Each failure is a `UserError` subclass whose message is one line naming the argument, so
`launch.run_user_errors` prints it as `error: ...` and exits 2 instead of a traceback.
"""
from __future__ import annotations

import math
import numbers
import os
import tempfile

from melody_jax.training.errors import UserError


MAX_SECONDS = 3600.0  # one call's audio
MAX_PROMPT_CHARS = 2000


class DurationError(UserError, ValueError):
    """A requested duration is not a positive finite number of seconds within the limit."""


class PromptError(UserError, ValueError):
    """A text prompt is not a string, too long, or holds characters that cannot be encoded."""


def check_duration(seconds: object, max_seconds: float, name: str = "duration") -> float:
    """`seconds` as a float when 0 < seconds <= max_seconds; else DurationError naming `name`."""
    if isinstance(seconds, bool) or not isinstance(seconds, numbers.Real):
        raise DurationError(f"--{name} must be a number of seconds, got {_short(seconds)}")
    try:
        value = float(seconds)
    except OverflowError:  # an integer beyond the float range
        raise DurationError(f"--{name} must lie in (0, {max_seconds:g}] seconds") from None
    if not math.isfinite(value):
        raise DurationError(f"--{name} must be a finite number of seconds, got {value}")
    if value <= 0:
        raise DurationError(f"--{name} must be > 0 seconds, got {value:g}")
    if value > max_seconds:
        raise DurationError(f"--{name}={value:g} s is longer than the maximum of {max_seconds:g} s")
    return value


def check_prompt(text: object, max_chars: int, *, allow_empty: bool = True, name: str = "prompt") -> str:
    """The prompt with surrounding whitespace removed; "" (unconditional) only when `allow_empty`.

    Rejected: non-strings, more than `max_chars` characters, NUL and other C0 control characters
    except tab/newline, and lone surrogates (not encodable as UTF-8).
    """
    if not isinstance(text, str):
        raise PromptError(f"--{name} must be text, got {type(text).__name__}")
    if len(text) > max_chars:
        raise PromptError(f"--{name} has {len(text)} characters; the maximum is {max_chars}")
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise PromptError(f"--{name} holds a lone surrogate U+{ord(ch):04X} at character {i} (not valid UTF-8)")
        if (ord(ch) < 32 and ch not in "\t\n\r") or ch == "\x7f":
            raise PromptError(f"--{name} holds the control character U+{ord(ch):04X} at character {i}")
    stripped = text.strip()
    if not stripped and not allow_empty:
        raise PromptError(f"--{name} is empty")
    return stripped


def _short(value: object, limit: int = 40) -> str:
    """A repr that stays on one short line, whatever the value."""
    text = repr(value).replace("\n", "\\n")
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ArgumentError(UserError, ValueError):
    """A command-line argument is out of range or names a path that cannot be used."""


class SamplingError(ArgumentError):
    """A sampling argument (seed, temperature, top-k/p, guidance, steps) or the output path is unusable."""


MIN_SECONDS = 0.1  # below this a bundle's rate rounds the audio to nothing (an empty WAV)
MAX_TEMPERATURE = 100.0
MAX_CFG = 100.0
MAX_STEPS = 1000
MAX_CANDIDATES = 64  # inpainting spans drawn at once (a batch of that many × the prompts)
SEED_LIMIT = 2**32  # seeds become uint32 PRNG keys; prompt i uses seed + i
OUTPUT_EXTENSIONS = (".wav",)


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SamplingError(f"--{name} must be a number, got {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise SamplingError(f"--{name} is too large") from None
    if not math.isfinite(number):
        raise SamplingError(f"--{name} must be a finite number, got {number}")
    return number


def _integer(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SamplingError(f"--{name} must be an integer, got {_short(value)}")
    return int(value)


def check_sampling(*, seed: object, count: int = 1, temperature: object = None, top_k: object = None,
                   top_p: object = None, cfg: object = None, steps: object = None, cfg_beta: object = None,
                   inpaint_candidates: object = None, lm_cfg: object = None) -> None:
    """Every sampling argument of `launch.sample` given in its range, before a bundle is loaded.

    `count` outputs use seeds seed … seed + count - 1, which must all fit a uint32 key; None means
    the bundle's default. Temperature 0 is greedy decoding.
    """
    seed = _integer(seed, "seed")
    if not 0 <= seed <= SEED_LIMIT - max(count, 1):
        uses = f"{count} prompts use seeds seed … seed+{count - 1}" if count > 1 else "a 32-bit seed"
        raise SamplingError(f"--seed={_short(seed)} must lie in [0, {SEED_LIMIT - max(count, 1)}] ({uses})")
    rules = (("temperature", temperature, _real, lambda v: 0 <= v <= MAX_TEMPERATURE,
              f"must lie in [0, {MAX_TEMPERATURE:g}] (0 = greedy)"),
             ("top_k", top_k, _integer, lambda v: v >= 0, "must be >= 0 (0 = off)"),
             ("top_p", top_p, _real, lambda v: 0 < v <= 1, "must lie in (0, 1] (1 = off)"),
             ("cfg", cfg, _real, lambda v: 0 <= v <= MAX_CFG, f"must lie in [0, {MAX_CFG:g}]"),
             ("cfg_beta", cfg_beta, _real, lambda v: 0 <= v <= MAX_CFG, f"must lie in [0, {MAX_CFG:g}]"),
             ("lm_cfg", lm_cfg, _real, lambda v: 0 <= v <= MAX_CFG, f"must lie in [0, {MAX_CFG:g}]"),
             ("steps", steps, _integer, lambda v: 1 <= v <= MAX_STEPS, f"must lie in [1, {MAX_STEPS}]"),
             ("inpaint_candidates", inpaint_candidates, _integer, lambda v: 1 <= v <= MAX_CANDIDATES,
              f"must lie in [1, {MAX_CANDIDATES}]"))
    for name, value, parse, ok, rule in rules:
        if value is not None and not ok(value := parse(value, name)):
            raise SamplingError(f"--{name}={value:g} {rule}" if parse is _real else f"--{name}={value} {rule}")


def check_min_duration(seconds: float, name: str = "duration") -> float:
    """A duration already through `check_duration` that also yields some audio."""
    if seconds < MIN_SECONDS:
        raise DurationError(f"--{name}={seconds:g} s is shorter than the minimum of {MIN_SECONDS:g} s")
    return seconds


def check_output_path(out: object, flag: str = "out", extensions: tuple[str, ...] | None = OUTPUT_EXTENSIONS) -> str:
    """`out` as an absolute path to a writable file (one of `extensions`, when given), checked before any
    work. Its folder is created if missing; a folder, or a file of another format, is refused."""
    if not isinstance(out, str) or not out.strip():
        raise SamplingError(f"--{flag} must name a file")
    try:
        os.fsencode(out)
    except UnicodeError:
        raise SamplingError(f"--{flag}={_short(out, 160)} cannot be encoded as a file name") from None
    if "\0" in out:
        raise SamplingError(f"--{flag}={_short(out, 160)} holds a NUL character")
    path = os.path.abspath(os.path.expanduser(out))
    if os.path.isdir(path) or out.endswith(os.sep):
        raise SamplingError(f"--{flag}={_short(out, 160)} is a folder; name a file in it")
    extension = os.path.splitext(path)[1].lower()
    if extensions is not None and extension not in extensions:
        raise SamplingError(f"--{flag}={_short(out, 160)} must end in {' or '.join(extensions)} "
                            f"(got {extension or 'no extension'})")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise SamplingError(f"--{flag}={_short(out, 160)}: cannot create its folder ({e.strerror or e})") from None
    try:  # a probe beside the output: permissions, read-only filesystems, a full disk's inode table
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_probe_"):
            pass
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise PermissionError(13, "Permission denied")
    except OSError as e:
        raise SamplingError(f"--{flag}={_short(out, 160)} is not writable ({e.strerror or e})") from None
    return path
