"""Metrics to `metrics.jsonl` (one object per logged step) and TensorBoard, from process 0 only."""
from __future__ import annotations

import json
import math
import os
from typing import Any


def _clean(value: Any) -> Any:
    value = float(value) if hasattr(value, "__float__") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible as strings
    return value


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
        kept = []
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8", errors="replace") as f:
                kept = [line for line in f if _step_of(line) is not None and _step_of(line) <= resume_step]
        tmp = self.path + ".tmp"  # replaced in one rename: a kill here never loses the kept lines
        with open(tmp, "w") as f:
            f.writelines(kept)
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
            f.write(json.dumps(record) + "\n")
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
