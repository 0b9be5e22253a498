"""What every CLI shares: quiet third-party logs, one-line user errors (flags included)."""
from __future__ import annotations

import logging as py_logging
import os
import sys
from collections.abc import Callable

from absl import app, flags, logging

from melody_jax.training.errors import UserError, one_line


def quiet_library_logs() -> None:
    """Orbax logs every save at INFO through absl, and each failure of an async save as an ERROR
    with a traceback from every thread it passed (a full disk: a hundred of them). Keep its warnings;
    drop the rest: every save failure also reaches the Checkpointer, which reports it in one line."""
    handler = logging.get_absl_handler()
    handler.addFilter(lambda r: r.levelno == py_logging.WARNING or "/orbax/" not in r.pathname)
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


def _without_closed_loop_noise(hook: Callable) -> Callable:
    """After a failed async save (or restore), TensorStore completes the abandoned writes on an event
    loop Orbax has already closed; each completion reports `RuntimeError: Event loop is closed` as an
    unraisable exception (dozens of tracebacks around the one line that matters). Only those are dropped."""

    def unraisablehook(unraisable) -> None:
        if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed":
            return
        hook(unraisable)

    return unraisablehook


def fail(message: str) -> None:
    """The one way a CLI refuses user input: `error: <one line>` on stderr, exit code 2."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(2)


def run_user_errors(fn: Callable[[], object]) -> object:
    """Runs fn; a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        return fn()
    except UserError as e:
        fail(str(e))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser with one-line errors: a bad flag value, an unknown config field (ml_collections
    raises KeyError/AttributeError from deep inside) or a config file that does not exist → exit 2."""
    try:
        rest = flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:  # ml_collections: an override of a field the config lacks
        field = str(e).strip("\"' ").split("'")[0]
        given = [a.split("=")[0] for a in argv[1:] if f".{field}" in a.split("=")[0]]
        fail(f"unknown config field {given[0] if given else repr(field)}; see the config file for the fields")
    except (flags.Error, TypeError, ValueError, OSError, SyntaxError) as e:
        fail(str(e) or type(e).__name__)
    for name in flags.FLAGS:
        filename = getattr(flags.FLAGS[name], "config_filename", None) if hasattr(
            flags.FLAGS[name], "_config_filename") else None
        if isinstance(filename, str) and filename and not os.path.isfile(filename.split(":")[0]):
            fail(f"--{name}={filename}: no such config file {filename.split(':')[0]!r}")
    return rest


def run_app(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with `parse_flags`: every CLI's entry point."""
    app.run(main, flags_parser=parse_flags)
