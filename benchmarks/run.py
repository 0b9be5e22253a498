"""`python -m benchmarks.run [--quick] [--only NAME ...]`: every benchmark section in one run.

Each section is a module `benchmarks/<name>.py` with `run(quick) -> dict` and `markdown(result) -> str`.
A section whose module (or stage) does not exist yet is reported as skipped with the reason.
All figures go to benchmarks/results/all.json with the machine description.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

from benchmarks.report import machine, write_json

SECTIONS = ("train_step", "data_pipeline", "dpd", "semantic_lm")


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
        result = module.run(quick)
        result["section_seconds"] = time.perf_counter() - t0
        results[name] = result
        print(module.markdown(result))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (minutes on 2 CPU cores)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    args = parser.parse_args()
    info = machine()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    results = run_sections(args.only or list(SECTIONS), args.quick)
    print("\nwrote", write_json("all", {"quick": args.quick, "sections": results}))


if __name__ == "__main__":
    sys.exit(main())
