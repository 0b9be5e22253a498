"""One trainer per workdir: an exclusive `fcntl.flock` on `WORKDIR/.lock`, held for the run's life.

The kernel drops the lock when its holder exits in any way (kill -9 and crashes included), so a
stale lock cannot outlive its process; the file's text (pid, host, start time) only names the holder
in the refusal. Only process 0 of a multi-process job takes it. Filesystems without flock (some NFS
mounts) run unlocked, with a warning.
"""
from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from absl import logging

from melody_jax.training.checkpoint import closing_checkpointers
from melody_jax.training.errors import WorkdirError

LOCK_NAME = ".lock"


def _holder(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            info = json.load(f)
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(info["started"])))
        return f"pid {int(info['pid'])} on host {info['host']} (started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (its pid could not be read)"


class WorkdirLock:
    """`acquire()` or WorkdirError naming the holder; `release()` (idempotent) when the run ends."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: int | None = None

    def acquire(self) -> WorkdirLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise WorkdirError(f"workdir {os.path.dirname(self.path)} is not writable: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise WorkdirError(f"workdir {os.path.dirname(self.path)} is in use by {_holder(self.path)}; "
                                   "wait for that run to end or use another --workdir") from None
            logging.warning("workdir lock unavailable on this filesystem (%s): running without one", e.strerror)
            return self
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def holds_workdir(train_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates `train(task, workdir, ...)`: process 0 holds the workdir's lock for the call, and
    every checkpoint manager the call opens is closed on every way out of it."""

    @functools.wraps(train_fn)
    def locked(task, workdir: str, *args, **kwargs):
        import jax

        if jax.process_index() != 0:
            with closing_checkpointers():
                return train_fn(task, workdir, *args, **kwargs)
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror or e}") from None
        lock = WorkdirLock(workdir).acquire()
        try:
            with closing_checkpointers():
                return train_fn(task, workdir, *args, **kwargs)
        finally:
            lock.release()

    return locked
