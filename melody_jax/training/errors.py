"""Errors a user can act on: the CLI prints their message as one line and exits non-zero."""

MAX_WORD_CHARS = 256  # long enough for any real path (object-store paths included)
MAX_MESSAGE_CHARS = 600


def one_line(text: str) -> str:
    """`text` on one bounded line: messages quote user values, which may be huge or hold newlines."""
    words = []
    for word in text.split():
        if len(word) > MAX_WORD_CHARS:
            word = f"{word[:160]}…({len(word) - 224} more characters)…{word[-64:]}"
        words.append(word)
    line = " ".join(words)
    return line if len(line) <= MAX_MESSAGE_CHARS else line[:MAX_MESSAGE_CHARS - 1] + "…"


class UserError(Exception):
    """Base: a problem with the user's input (config, workdir, data, bundle), not a bug."""

    def __str__(self) -> str:
        return one_line(super().__str__())


class ConfigError(UserError, ValueError):
    """A config value is invalid; the message names the field."""


class WorkdirError(UserError):
    """The workdir cannot be used (unwritable, or holds another model's checkpoints)."""


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


class BundleError(UserError):
    """A bundle is incomplete, or its stages do not fit together (rates, sizes, vocabularies)."""


class EvaluationError(UserError):
    """An evaluation instrument is missing or broken (e.g. musicnn not installed, checkpoint unreadable)."""
