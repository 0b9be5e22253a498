"""Metrics to `metrics.jsonl` (one object per logged step) and TensorBoard, from process 0 only.

The log is append-only while a run holds the workdir; a resume repairs it (torn lines from a kill,
steps past the restored checkpoint, duplicates) in one atomic rewrite, so it is one trajectory with each
step once. `final_metrics.json` is derived from it, so rerunning a finished run rewrites the same file.
Every file is strict JSON: NaN/Inf are written as the strings "nan"/"inf".
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import logging


def _clean(value: Any) -> Any:
    if isinstance(value, (bool, int, str)):
        return value
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


def json_safe(value: Any) -> Any:
    """`value` with every non-finite float (nested in dicts, lists, NumPy scalars) as its string."""
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    return _clean(value) if hasattr(value, "__float__") else value


def _step_of(line: str) -> int | None:
    """The step of one logged line; None for a blank or torn line (a kill -9 mid-write)."""
    try:
        record = json.loads(line)
        return int(record["step"]) if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


class MetricsWriter:
    """On resume, log lines past the restored step are dropped so the file is one trajectory."""

    def __init__(self, workdir: str, *, enabled: bool, tensorboard: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        kept: dict[int, str] = {}
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    step = _step_of(line)
                    if step is not None and step <= resume_step:
                        kept.setdefault(step, line)  # the first line of a step (a duplicate is a second run's)
        tmp = self.path + ".tmp"  # replaced in one rename: a kill here never loses the kept lines
        with open(tmp, "w") as f:
            f.writelines(kept[step] for step in sorted(kept))
        os.replace(tmp, self.path)
        if tensorboard:
            import tensorflow as tf  # only the logging process pays for the import

            self._tf = tf
            self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in sorted(metrics.items())}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            with self._tb.as_default(step=int(step)):
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)):
                        self._tf.summary.scalar(key, value)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json_atomic(path: str, data: Any, *, sort_keys: bool = True, default: Any = None) -> None:
    """Strict JSON (NaN/Inf as strings, never bare), replaced in one rename: a reader never sees half
    a file. Every JSON file the project writes goes through here."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(data), f, indent=2, sort_keys=sort_keys, allow_nan=False, default=default)
    os.replace(tmp, path)


def final_metrics(workdir: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The run's summary completed from the log's line at its final step (a rerun of a finished run
    logs nothing new and must report what the run measured), cleaned for strict JSON; warns when
    steps were skipped as non-finite."""
    logged = [m for m in read_metrics(workdir) if m.get("step") == summary.get("step")]
    final = {**(logged[-1] if logged else {}), **{k: _clean(v) for k, v in summary.items()}}
    bad = final.get("bad_steps")
    if isinstance(bad, (int, float)) and bad > 0:
        final["bad_steps"] = int(bad)
        logging.warning("%d of %s steps were skipped: non-finite loss or gradients (bad_steps in metrics.jsonl)",
                        int(bad), final.get("step"))
    return final
