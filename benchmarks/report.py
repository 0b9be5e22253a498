"""What every benchmark shares: timing, the machine description, Markdown tables and JSON output."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_time(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall seconds of fn() with its outputs ready (block_until_ready), after warm-up calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    import flax

    return {"cpu": cpu, "cores": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
            "platform": jax.default_backend(), "devices": jax.device_count(),
            "jax": jax.__version__, "flax": flax.__version__}


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "-")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def chosen_presets(default: Sequence[str]) -> tuple[str, ...]:
    """`BENCH_PRESETS=tiny,small` (or `run.py --presets`) overrides a section's presets, e.g. for tests."""
    names = os.environ.get("BENCH_PRESETS", "").strip()
    return tuple(n.strip() for n in names.split(",") if n.strip()) if names else tuple(default)


def write_json(name: str, payload: dict[str, Any], directory: str | None = None) -> str:
    directory = directory or RESULTS_DIR
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    with open(path, "w") as f:
        json.dump({"machine": machine(), **payload}, f, indent=2, sort_keys=True, default=str)
    return path


def quick_cli(name: str, doc: str, quick: str, run: Callable[[bool], dict[str, Any]],
              markdown: Callable[[dict[str, Any]], str]) -> None:
    """A section's command line: `--quick` (what `quick` says), then its table and where its JSON went."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick)
    result = run(parser.parse_args().quick)
    print(markdown(result))
    print("wrote", write_json(name, result))


def partitions(compiled) -> int:
    """Devices an SPMD program runs on: the largest device set among its input and output shardings."""
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    return max((len(s.device_set) for s in shardings), default=1)


def compiled_flops(compiled) -> float:
    """XLA's own FLOP count of a compiled computation (cost_analysis), summed over its partitions.

    cost_analysis describes one partition of an SPMD program, so on a mesh of n devices it reports
    about 1/n of the work; the total is what an analytic count of the whole computation compares with.
    """
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)) * partitions(compiled)
