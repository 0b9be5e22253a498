"""What every CLI shares: quiet third-party logs, one-line user errors."""
from __future__ import annotations

import logging as py_logging
import sys
from collections.abc import Callable

from absl import logging

from melody_jax.training.errors import UserError


def quiet_library_logs() -> None:
    """Orbax logs every save at INFO through absl; keep its warnings, drop its chatter."""
    handler = logging.get_absl_handler()
    handler.addFilter(lambda r: r.levelno >= py_logging.WARNING or "/orbax/" not in r.pathname)


def run_user_errors(fn: Callable[[], object]) -> object:
    """Runs fn; a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
