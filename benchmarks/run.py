"""`python -m benchmarks.run [--quick] [--only NAME ...]`: every benchmark section in one run.

Each section is a module `benchmarks/<name>.py` with `run(quick) -> dict` and `markdown(result) -> str`.
A section whose module (or stage) does not exist yet is reported as skipped with the reason.
All figures go to benchmarks/results/all.json with the machine description.
`--presets tiny` (env BENCH_PRESETS) replaces every section's presets. Compiled programs are kept in
JAX's persistent compilation cache (benchmarks/results/jax_cache, or env JAX_COMPILATION_CACHE_DIR),
so a second run skips XLA compilation; each section reports its compile seconds (`compile_seconds`,
backend compiles and cache reads, from jax.monitoring) apart from its wall time.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

import jax

from benchmarks.report import RESULTS_DIR, machine, write_json

SECTIONS = ("train_step", "data_pipeline", "dpd", "semantic_lm", "musicgen", "sampling", "forward_passes", "peer")
COMPILE_EVENTS = ("/jax/core/compile/backend_compile_duration",)
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def enable_compilation_cache(directory: str | None = None) -> str:
    """Persistent XLA cache: repeated benchmark runs (and their warm-ups) reuse compiled programs."""
    directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(RESULTS_DIR, "jax_cache")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory


class CompileClock:
    """Sums compile durations reported through jax.monitoring while active (a cache hit counts its read)."""

    def __init__(self) -> None:
        self.seconds, self.count, self.cache_hits = 0.0, 0, 0

    def __call__(self, event: str, duration: float, **_: object) -> None:
        if event in COMPILE_EVENTS:
            self.seconds += duration
            self.count += 1

    def _hit(self, event: str, **_: object) -> None:
        self.cache_hits += event == CACHE_HIT_EVENT

    def __enter__(self) -> "CompileClock":
        jax.monitoring.register_event_duration_secs_listener(self)
        jax.monitoring.register_event_listener(self._hit)
        return self

    def __exit__(self, *exc: object) -> None:
        jax.monitoring.unregister_event_duration_listener(self)
        jax.monitoring.unregister_event_listener(self._hit)


def run_sections(names: list[str], quick: bool) -> dict:
    results: dict = {}
    for name in names:
        print(f"\n## {name}\n", flush=True)
        try:
            module = importlib.import_module(f"benchmarks.{name}")
        except ModuleNotFoundError as e:
            results[name] = {"skipped": f"module {e.name} does not exist yet"}
            print(f"skipped: {results[name]['skipped']}")
            continue
        t0 = time.perf_counter()
        with CompileClock() as clock:
            result = module.run(quick)
        result["section_seconds"] = time.perf_counter() - t0
        result.update(compile_seconds=clock.seconds, compiles=clock.count, compile_cache_hits=clock.cache_hits)
        results[name] = result
        print(module.markdown(result))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (minutes on 2 CPU cores)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--presets", help="comma-separated presets for every section, e.g. tiny")
    args = parser.parse_args()
    if args.presets:
        os.environ["BENCH_PRESETS"] = args.presets
    print("compilation cache:", enable_compilation_cache())
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = run_sections(args.only or list(SECTIONS), args.quick)
    print("\nwrote", write_json("all", {"quick": args.quick, "sections": results}))


if __name__ == "__main__":
    sys.exit(main())
