"""Orbax checkpoints: async saves, keep-last-N, the data position and a model signature beside the state.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Orbax writes into a temporary directory and
renames it when complete, so an interrupted save is never mistaken for a checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from melody_jax.training.errors import WorkdirError


def param_signature(abstract_params: Any) -> dict[str, list[int]]:
    """{'path/to/param': shape} — enough to tell one model from another."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): list(leaf.shape) for path, leaf in flat}


def check_compatible(meta: dict[str, Any], stage: str, signature: dict[str, list[int]], where: str,
                     seed: int | None = None) -> None:
    """One-line error when a workdir holds another stage's or another architecture's checkpoint, or
    (`seed` given, for a resume) one trained with another seed: its data order and RNG streams differ."""
    advice = ("use another --workdir" if where.startswith("workdir ") else
              "point to the folder of that stage (a bundle's: rebuild the bundle)")
    if meta.get("stage") != stage:
        raise WorkdirError(f"{where} holds a checkpoint of stage {meta.get('stage')!r}, not {stage!r}; {advice}")
    saved = meta.get("param_signature", {})
    for name in sorted(set(saved) | set(signature)):
        if saved.get(name) != signature.get(name):
            raise WorkdirError(f"{where} holds a checkpoint of a different model: parameter {name} has shape "
                               f"{saved.get(name)} there and {signature.get(name)} in this config; {advice}")
    if seed is not None and meta.get("seed", seed) != seed:
        raise WorkdirError(f"{where} was trained with config.seed={meta['seed']}, not {seed}; resume with "
                           f"--config.seed={meta['seed']} or use another --workdir")


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point arrays in `tree` that hold a NaN or Inf (one small reduction each)."""
    import jax.numpy as jnp

    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all()):
            bad.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return bad


def _first_line(e: BaseException) -> str:
    """The readable part of an Orbax/TensorStore error: its first line, without the JSON spec and
    source-location dumps TensorStore appends in brackets."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return re.split(r"\s*\[(?:tensorstore_spec(?:\[\d+\])?|source locations|os_error_code)=", line)[0]


_OPEN: set[Checkpointer] = set()


@contextlib.contextmanager
def closing_checkpointers() -> Iterator[None]:
    """Closes every Checkpointer opened in the block and still open when it ends, however it ends: a
    manager left open keeps Orbax threads that print tracebacks at interpreter shutdown."""
    before = set(_OPEN)
    try:
        yield
    finally:
        for ckpt in list(_OPEN - before):
            ckpt.close()


@contextlib.contextmanager
def reading(workdir: str) -> Iterator["Checkpointer"]:
    """The checkpoints of another run (a workdir or a bundle's stage), opened to read and closed after."""
    ckpt = Checkpointer(workdir, keep=1, every=1)
    try:
        yield ckpt
    finally:
        ckpt.close()


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, every: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True, create=True,
            cleanup_tmp_directories=True)  # saves a kill -9 interrupted: never complete, never read
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        _OPEN.add(self)

    def should_save(self, step: int) -> bool:
        """Whether `save(step)` would write (the interval, or a preemption Orbax noticed)."""
        return self.manager.should_save(step)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        try:
            return self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=force)
        except Exception as e:  # noqa: BLE001 - this save's or an earlier async save's failure
            raise self._save_failed(e, step) from e

    def _save_failed(self, e: BaseException, step: int | None) -> WorkdirError:
        """A failed (async) save as one line; the finished checkpoints before it stay usable."""
        text = str(e)
        if "No space left" in text or "os_error_code='28'" in text or getattr(e, "errno", None) == 28:
            reason = "the disk is full (no space left on device)"
        else:
            reason = _first_line(e)[:300]
        where = self.directory if step is None else f"{self.directory}/{step}"
        return WorkdirError(f"checkpoint {where} could not be saved: {reason}; the complete checkpoints before it "
                            "are intact: fix this and run the same command to resume")

    def newest(self, missing: str) -> tuple[int, dict]:
        """(step, meta) of the newest checkpoint; WorkdirError(`missing`) when there is none."""
        step = self.latest_step()
        if step is None:
            raise WorkdirError(missing)
        return step, self.read_meta(step)

    def read_meta(self, step: int) -> dict:
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - a truncated or foreign step directory
            raise WorkdirError(f"checkpoint {self.directory}/{step} could not be read: {_first_line(e)}; "
                               "delete that step directory to resume from an earlier one") from e
        if not isinstance(meta, dict):
            raise WorkdirError(f"checkpoint {self.directory}/{step} is not a melody-jax checkpoint (no meta)")
        return meta

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - any failure here is a damaged checkpoint for the user
            raise WorkdirError(f"checkpoint {self.directory}/{step} could not be restored: {_first_line(e)}; "
                               "delete that step directory to resume from an earlier one") from e
        bad = non_finite_leaves(out["state"])
        if bad:  # training never saves such a state (guarded steps), so the files were damaged
            raise WorkdirError(f"checkpoint {self.directory}/{step} is damaged: {len(bad)} arrays hold NaN/Inf "
                               f"(first: {bad[0]}); delete that step directory to resume from an earlier one")
        return out["state"], out["data"]

    def restore_params(self, step: int, abstract_params: Any, key: str = "params") -> Any:
        """Only `state.<key>` of a step (`params`, or `ema` when the run kept one): no optimizer state is read."""
        item = {key: abstract_params}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        except Exception as e:  # noqa: BLE001 - any failure here is a damaged checkpoint for the user
            raise WorkdirError(f"checkpoint {self.directory}/{step} could not be restored: {_first_line(e)}") from e
        bad = non_finite_leaves(out["state"][key])
        if bad:
            raise WorkdirError(f"checkpoint {self.directory}/{step} is damaged: {len(bad)} parameter arrays hold "
                               f"NaN/Inf (first: {bad[0]})")
        return out["state"][key]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - an async save that failed in the background
            raise self._save_failed(e, None) from e

    def close(self) -> None:
        """Idempotent: the loop closes on its own paths, `closing_checkpointers` on every other."""
        if self in _OPEN:
            _OPEN.discard(self)
            try:
                self.manager.close()
            except Exception as e:  # noqa: BLE001 - a failed save already raised; closing must not hide it
                logging.warning("closing the checkpoint manager: %s", _first_line(e)[:300])
