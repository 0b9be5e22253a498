"""Checks on what a user hands the sampling pipelines (durations, prompts), before any compute.

Each failure is a `UserError` subclass whose message is one line naming the argument, so
`launch.run_user_errors` prints it as `error: ...` and exits 2 instead of a traceback.
"""
from __future__ import annotations

import math
import numbers

from melody_jax.training.errors import UserError


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
