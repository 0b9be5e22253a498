"""Orbax checkpoints: async saves, keep-last-N, the data position and a model signature beside the state.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Orbax writes into a temporary directory and
renames it when complete, so an interrupted save is never mistaken for a checkpoint.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp

from melody_jax.training.errors import WorkdirError


def param_signature(abstract_params: Any) -> dict[str, list[int]]:
    """{'path/to/param': shape} — enough to tell one model from another."""
    flat = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): list(leaf.shape) for path, leaf in flat}


def check_compatible(meta: dict[str, Any], stage: str, signature: dict[str, list[int]], where: str) -> None:
    """One-line error when a workdir holds another stage's or another architecture's checkpoint."""
    if meta.get("stage") != stage:
        raise WorkdirError(f"{where} holds a checkpoint of stage {meta.get('stage')!r}, not {stage!r}; "
                           "use another --workdir")
    saved = meta.get("param_signature", {})
    for name in sorted(set(saved) | set(signature)):
        if saved.get(name) != signature.get(name):
            raise WorkdirError(f"{where} holds a checkpoint of a different model: parameter {name} has shape "
                               f"{saved.get(name)} there and {signature.get(name)} in this config; "
                               "use another --workdir")


def non_finite_leaves(tree: Any) -> list[str]:
    """Paths of the floating-point arrays in `tree` that hold a NaN or Inf (one small reduction each)."""
    import jax.numpy as jnp

    bad = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.isfinite(leaf).all()):
            bad.append(jax.tree_util.keystr(path, simple=True, separator="/"))
    return bad


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force)

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
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkdirError(f"checkpoint {self.directory}/{step} could not be restored: {msg}; "
                               "delete that step directory to resume from an earlier one") from e
        bad = non_finite_leaves(out["state"])
        if bad:  # training never saves such a state (guarded steps), so the files were damaged
            raise WorkdirError(f"checkpoint {self.directory}/{step} is damaged: {len(bad)} arrays hold NaN/Inf "
                               f"(first: {bad[0]}); delete that step directory to resume from an earlier one")
        return out["state"], out["data"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Only `state.params` of a step (for frozen use and bundles): no optimizer state is read."""
        item = {"params": abstract_params}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        except Exception as e:  # noqa: BLE001 - any failure here is a damaged checkpoint for the user
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkdirError(f"checkpoint {self.directory}/{step} could not be restored: {msg}") from e
        bad = non_finite_leaves(out["state"]["params"])
        if bad:
            raise WorkdirError(f"checkpoint {self.directory}/{step} is damaged: {len(bad)} parameter arrays hold "
                               f"NaN/Inf (first: {bad[0]})")
        return out["state"]["params"]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        """Idempotent: the loop closes on its own paths, `closing_checkpointers` on every other."""
        if self in _OPEN:
            _OPEN.discard(self)
            self.manager.close()
