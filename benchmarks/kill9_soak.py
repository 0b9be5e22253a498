"""kill -9 soak (issue 27): a toy run killed at N seeded random moments, restarted after each kill; the
final `metrics.jsonl` must equal an uninterrupted run's line for line (timing fields aside) and every
restart must resume from the newest complete checkpoint.

`python -m benchmarks.kill9_soak [--kills=20] [--seed=27] [--steps=80]` (about 10 s per restart on a
2-core machine, so it is a script, not a suite test; tests/test_kill9.py runs 4 kills in the suite).
Prints one JSON line; exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers import ROOT, cli_env
from tests.test_kill9 import complete_steps, kill_when, last_logged, tmp_dirs

TIMING = ("steps_per_sec", "examples_per_sec")


def _start(workdir: Path, log: Path, steps: int) -> subprocess.Popen:
    flags = ("--config=configs/toy_lm.py:tiny", f"--config.train.num_steps={steps}", "--config.train.checkpoint_every=1",
             "--config.train.keep_checkpoints=3", "--config.train.log_every=1", "--config.train.tensorboard=False",
             "--config.train.progress_bar=False")
    with open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "launch.train", f"--workdir={workdir}", *flags], cwd=ROOT,
                                env=cli_env(), stdout=subprocess.DEVNULL, stderr=err)


def _lines(workdir: Path) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def soak(kills: int, seed: int, steps: int, root: Path) -> dict:
    rng = random.Random(seed)
    reference = root / "reference"
    ref = _start(reference, root / "reference.log", steps)
    assert ref.wait(timeout=600) == 0, (root / "reference.log").read_text()[-3000:]
    workdir, resumed, expected = root / "killed", [], []
    started = time.monotonic()
    for i in range(kills):
        before = last_logged(workdir)
        assert before + 3 < steps, f"the run reached step {before} after {i} kills: raise --steps"
        log = root / f"run{i}.log"
        proc = _start(workdir, log, steps)
        progress = before + rng.randint(1, 2)
        if i % 2 == 0:  # inside a checkpoint write
            kill_when(proc, lambda: last_logged(workdir) >= progress and tmp_dirs(workdir), "a checkpoint write")
        else:  # a random moment after a step
            kill_when(proc, lambda: last_logged(workdir) >= progress, f"step {progress}", rng.uniform(0.0, 0.4))
        found = re.findall(r"resumed from step (\d+)", log.read_text(errors="replace"))
        if i:
            resumed.append(int(found[0]) if found else 0)
        expected.append(max(complete_steps(workdir), default=0))  # 0: the kill hit the first save
    log = root / "final.log"
    proc = _start(workdir, log, steps)
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    resumed.append(int(re.findall(r"resumed from step (\d+)", log.read_text())[0]))
    want, got = _lines(reference), _lines(workdir)
    return {"kills": kills, "seed": seed, "steps": steps, "seconds": round(time.monotonic() - started, 1),
            "resumed_from": resumed, "newest_complete_at_kill": expected, "resumed_from_newest": resumed == expected,
            "lines": len(got), "identical_lines": got == want,
            "first_difference": next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=27)
    parser.add_argument("--steps", type=int, default=80)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.kills, args.seed, args.steps, Path(tmp))
    print(json.dumps(result))
    sys.exit(0 if result["identical_lines"] and result["resumed_from_newest"] else 1)


if __name__ == "__main__":
    main()
