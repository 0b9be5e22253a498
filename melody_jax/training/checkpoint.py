"""Orbax checkpoints: async saves, keep-last-N, the data position and a model signature beside the state.

Layout: `WORKDIR/checkpoints/<step>/{state,data,meta}`. Orbax writes into a temporary directory and
renames it when complete, so an interrupted save is never mistaken for a checkpoint.
"""
from __future__ import annotations

import os
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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, every: int):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=every, enable_async_checkpointing=True, create=True,
            cleanup_tmp_directories=True)  # saves a kill -9 interrupted: never complete, never read
        self.manager = ocp.CheckpointManager(self.directory, options=options)

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
        return out["state"], out["data"]

    def restore_params(self, step: int, abstract_params: Any, key: str = "params") -> Any:
        """Only `state.<key>` of a step (`params`, or `ema` when the run kept one): no optimizer state is read."""
        item = {key: abstract_params}
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
        except Exception as e:  # noqa: BLE001 - any failure here is a damaged checkpoint for the user
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise WorkdirError(f"checkpoint {self.directory}/{step} could not be restored: {msg}") from e
        return out["state"][key]

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
