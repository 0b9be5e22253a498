"""`launch.tokenize` at growing dataset sizes: flat host memory, and throughput on 8 devices vs 1.

`python -m benchmarks.tokenize_memory [--quick]` prepares synthetic datasets of 100 and 1,000
clips of 5 s (held in RAM as float32 they would take 48 and 480 MB, what the job must not hold),
initialises the five tiny frozen stages untrained (speed and memory do not
depend on the weights), and runs `launch.tokenize` (`--crops=random --crops_per_clip=1`: one 0.64-s
crop per clip, the tiny DPD's window, so every clip is read whole for one forward row) on each as a
child process on 8 fake CPU devices, recording its peak RSS (`wait4`'s ru_maxrss) and wall time.
Figures:
- peak RSS at 100 and at 1,000 clips and their ratio (the job streams: it should stay within 20 %);
- crops per second of `tokenize_dataset` over the 1,000 clips in this process on 8 fake CPU devices
  and on 1 (the frozen step compiled before the clock starts; reading and writing included).
Writes benchmarks/results/tokenize_memory.json. `--quick`: 50 and 200 clips.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from benchmarks.report import quick_cli
from configs.melody import TOKENIZE_STAGES

CROP_SECONDS = 0.64
CLIP_SECONDS = 5.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenize_run(data: str, stages: dict[str, str], out: str, devices: int) -> dict[str, float]:
    """One `launch.tokenize` child on `devices` CPU devices: its peak RSS (MiB), wall seconds, crops."""
    from melody_jax.tasks.sources import read_manifest
    from melody_jax.training.distributed import process_env

    cmd = [sys.executable, "-m", "launch.tokenize", f"--data={data}", f"--out={out}", "--splits=train",
           f"--crop_seconds={CROP_SECONDS}", "--crops=random", "--crops_per_clip=1", "--batch_size=8",
           *(f"--{'vae' if s == 'vae_gan' else s}={d}" for s, d in stages.items())]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=process_env(devices), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"launch.tokenize exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
    proc.stderr.close()
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "seconds": seconds,
            "crops": read_manifest(out)["splits"]["train"]["records"]}


def run(quick: bool) -> dict[str, Any]:
    from benchmarks.untrained import init_workdir
    from configs.common import stage_config
    from data_pipeline.builder import PrepareSettings, prepare
    from melody_jax.training.distributed import process_env

    sizes = (50, 200) if quick else (100, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        stages = {s: os.path.join(tmp, s) for s in TOKENIZE_STAGES}
        for stage, workdir in stages.items():
            init_workdir(stage_config(stage, "tiny", {"train.tensorboard": False}), workdir)
        data = {}
        for n in sizes:
            data[n] = os.path.join(tmp, f"data{n}")
            prepare(PrepareSettings(source="synthetic", num_clips=n, clip_seconds=CLIP_SECONDS, seed=0),
                    data[n], progress=False)
        runs = {n: tokenize_run(data[n], stages, os.path.join(tmp, f"out{n}"), 8) for n in sizes}
        result: dict[str, Any] = {"clips": list(sizes), "runs": runs,
                                  "rss_ratio": runs[sizes[1]]["peak_rss_mib"] / runs[sizes[0]]["peak_rss_mib"]}
        for devices in (8, 1):  # each in a child process that has only that many CPU devices
            code = (f"from benchmarks.tokenize_memory import throughput; "
                    f"print(throughput({data[sizes[1]]!r}, {stages!r}, {os.path.join(tmp, f't{devices}')!r}))")
            out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=process_env(devices), check=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            result[f"crops_per_s_{devices}dev"] = float(out.stdout.strip().splitlines()[-1])
    return result


def throughput(data: str, stage_dirs: dict[str, str], out: str) -> float:
    """Crops a second of `tokenize_dataset` in this process on all its devices, compiled first."""
    import numpy as np

    from data_pipeline.tokenized import CropSpec, FrozenStages, tokenize_dataset
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    stages = FrozenStages(stage_dirs, make_mesh({"data": -1}), DEFAULT_RULES)
    stages(np.zeros((8, int(CROP_SECONDS * stages.vae.sample_rate)), np.float32), [""] * 8)  # compiled before the clock
    start = time.perf_counter()
    written = tokenize_dataset(data, ["train"], out, stages, CropSpec(CROP_SECONDS, "random", per_clip=1), 8)
    return written["train"]["records"] / (time.perf_counter() - start)


def markdown(result: dict[str, Any]) -> str:
    lines = ["| clips | crops | wall s | peak RSS MiB |", "|---|---|---|---|"]
    for n, r in result["runs"].items():
        lines.append(f"| {n} | {r['crops']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", f"peak RSS at {result['clips'][1]} / at {result['clips'][0]} clips: {result['rss_ratio']:.3f}",
              f"tokenising {result['clips'][1]} clips, compiled: {result['crops_per_s_8dev']:.1f} crops/s on 8 "
              f"devices, {result['crops_per_s_1dev']:.1f} on 1"]
    return "\n".join(lines)


def main() -> None:
    quick_cli("tokenize_memory", __doc__, "50 and 200 clips", run, markdown)


if __name__ == "__main__":
    main()
