"""What every CLI shares: quiet third-party logs, one-line user errors (flags included), `--config` loading."""
from __future__ import annotations

import logging as py_logging
import os
import runpy
import sys
import traceback
from collections.abc import Callable

import ml_collections
from absl import app, flags, logging

from melody_jax.training.errors import ConfigError, UserError, one_line


def quiet_library_logs() -> None:
    """Orbax logs every save at INFO through absl, and each failure of an async save as an ERROR
    with a traceback from every thread it passed (a full disk: a hundred of them). Keep its warnings;
    drop the rest: every save failure also reaches the Checkpointer, which reports it in one line."""
    logging.get_absl_handler().addFilter(_not_orbax_noise)
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)


def _not_orbax_noise(record: py_logging.LogRecord) -> bool:
    """False for a record below or above WARNING that Orbax logs or whose exception was raised inside Orbax: a
    failed restore reads arrays concurrently, raises the first failure and leaves the other reads' asyncio tasks,
    and when one is collected asyncio logs `Task exception was never retrieved` with its traceback."""
    if record.levelno == py_logging.WARNING:
        return True
    files = [record.pathname]
    if record.exc_info and record.exc_info[2] is not None:
        files += [frame.f_code.co_filename for frame, _ in traceback.walk_tb(record.exc_info[2])]
    return not any("/orbax/" in f for f in files)


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


CONFIG_OVERRIDES: dict[str, str] = {}  # the `--config.a.b=value` arguments, taken out of argv by parse_flags


def load_config(spec: str, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """`--config=configs/<stage>.py[:<preset>]`: the file's get_config(preset), with the overrides applied by
    `apply_overrides`, so an override means the same here as in sweeps, the demo and the tests."""
    from melody_jax.training.config import apply_overrides

    path, _, preset = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config={spec}: no such config file {path!r}")
    get_config = runpy.run_path(path)["get_config"]
    try:
        config = get_config(preset) if preset else get_config()
    except ValueError as e:  # an unknown preset
        raise ConfigError(f"--config={spec}: {e}") from None
    return apply_overrides(config, overrides)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser with one-line errors (exit 2); where a CLI has `--config`, its `--config.a.b=value`
    arguments are kept aside in CONFIG_OVERRIDES for `load_config`, not parsed as flags."""
    overrides = [a for a in argv[1:] if a.startswith("--config.")] if "config" in flags.FLAGS else []
    for arg in overrides:
        key, sep, value = arg.removeprefix("--config.").partition("=")
        if not sep:
            fail(f"{arg}: write a config override as --config.a.b=value")
        CONFIG_OVERRIDES[key] = value
    try:
        return flags.FLAGS([a for a in argv if a not in overrides])
    except flags.Error as e:
        fail(str(e))


class DistributedFlags:
    """`--distributed/--coordinator/--num_processes/--process_id`: what every multi-host CLI takes."""

    def __init__(self):
        self.mode = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Join a multi-process job: "
                                      "auto = when a coordinator is given or a cluster (SLURM, Cloud TPU) detected.")
        self.coordinator = flags.DEFINE_string("coordinator", "", "HOST:PORT of process 0's coordinator (explicit "
                                               "start-up).")
        self.num_processes = flags.DEFINE_integer("num_processes", 0, "Processes in the job (explicit start-up).")
        self.process_id = flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")

    def join(self) -> bool:
        """Joins the job (before JAX touches a device); one-line errors. True when distributed."""
        from melody_jax.training.distributed import initialize

        return run_user_errors(lambda: initialize(self.mode.value, self.coordinator.value, self.num_processes.value,
                                                  self.process_id.value))


def run_app(main: Callable[[list[str]], None]) -> None:
    """`app.run(main)` with `parse_flags`: every CLI's entry point."""
    app.run(main, flags_parser=parse_flags)
