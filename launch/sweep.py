"""Config sweeps: the product of `--grid` overrides, one workdir per run, a results table at the end.

  python -m launch.sweep --config=configs/toy_lm.py:tiny --grid='optim.lr=1e-4,3e-4' \\
      --grid='model.num_layers=2,4' --workdir_root=DIR [--dry_run]

Runs go one after another in this process (each resumes if interrupted; finished ones are skipped),
or with --dry_run are printed as `launch.train` commands for a cluster scheduler.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex

from absl import flags, logging

from launch.common import CONFIG_OVERRIDES, load_config, quiet_library_logs, run_app, run_user_errors
from melody_jax.training.config import apply_overrides
from melody_jax.training.errors import ConfigError, UserError
from melody_jax.training.metrics import write_json_atomic

_CONFIG = flags.DEFINE_string("config", None, "Base stage config and preset, e.g. configs/toy_lm.py:tiny; "
                             "--config.a.b=value overrides a field.")
_GRID = flags.DEFINE_multi_string("grid", [], "'a.b=v1,v2,...': one axis of the sweep (repeatable).")
_ROOT = flags.DEFINE_string("workdir_root", None, "Each run's workdir is ROOT/<its overrides>.")
_DRY = flags.DEFINE_bool("dry_run", False, "Print one launch.train command per run instead of running.")
flags.mark_flags_as_required(["config", "workdir_root"])


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise ConfigError(f"--grid={spec!r} must look like 'a.b=v1,v2'")
        axes.append((key.strip(), [v.strip() for v in values.split(",") if v.strip()]))
    return axes


def expand(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(vals for _, vals in axes))]


def run_name(overrides: dict[str, str]) -> str:
    name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)


def finished(workdir: str, num_steps: int) -> dict | None:
    path = os.path.join(workdir, "final_metrics.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        summary = json.load(f)
    return summary if summary.get("status") == "done" and summary.get("step") == num_steps else None


def table(rows: list[tuple[str, dict]]) -> str:
    metrics = sorted({k for _, s in rows for k in s if k == "loss" or k.startswith("eval_")})
    lines = ["| run | status | step | " + " | ".join(metrics) + " |",
             "|---" * (3 + len(metrics)) + "|"]
    for name, s in rows:
        cells = [f"{s[m]:.4g}" if isinstance(s.get(m), (int, float)) else "-" for m in metrics]
        lines.append(f"| {name} | {s.get('status', '-')} | {s.get('step', '-')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep(base, grid: list[str], root: str, dry_run: bool, base_overrides: dict[str, str],
          config_arg: str) -> list[tuple[str, dict]]:
    from melody_jax.tasks.registry import get_task
    from melody_jax.training.loop import train

    runs = expand(parse_grid(grid))
    configs = [(run_name(o), o, apply_overrides(base, o)) for o in runs]  # validates every key first
    if dry_run:
        for name, overrides, _ in configs:
            args = [f"--config={config_arg}", f"--workdir={os.path.join(root, name)}"]
            args += [f"--config.{k}={v}" for k, v in {**base_overrides, **overrides}.items()]
            print("python -m launch.train " + " ".join(shlex.quote(a) for a in args))
        return []
    rows = []
    for i, (name, _, config) in enumerate(configs):
        workdir = os.path.join(root, name)
        summary = finished(workdir, config.train.num_steps)
        if summary is not None:
            logging.info("[%d/%d] %s: already finished, skipped", i + 1, len(configs), name)
            rows.append((name, {**summary, "status": "skipped (done)"}))
            continue
        logging.info("[%d/%d] %s", i + 1, len(configs), name)
        try:
            rows.append((name, train(get_task(config), workdir)))
        except UserError as e:  # one bad run must not end the sweep
            rows.append((name, {"status": f"failed: {e}"}))
    os.makedirs(root, exist_ok=True)
    write_json_atomic(os.path.join(root, "sweep_results.json"), [{"run": n, **s} for n, s in rows], default=str)
    return rows


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    rows = run_user_errors(lambda: sweep(load_config(_CONFIG.value, CONFIG_OVERRIDES), _GRID.value, _ROOT.value,
                                         _DRY.value, CONFIG_OVERRIDES, _CONFIG.value))
    if rows:
        print(table(rows))


if __name__ == "__main__":
    run_app(main)
