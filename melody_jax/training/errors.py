"""Errors a user can act on: the CLI prints their message as one line and exits non-zero."""


class UserError(Exception):
    """Base: a problem with the user's input (config, workdir, data, bundle), not a bug."""


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
