"""`launch.tokenize` at growing dataset sizes: flat host memory, and throughput on 8 devices vs 1.

`python -m benchmarks.tokenize_memory [--quick]` prepares synthetic datasets of 100 and 1,000
clips of 5 s (held in RAM as float32 they would take 48 and 480 MB, what the job must not hold),
initialises the five tiny frozen stages untrained (speed and memory do not
depend on the weights), and runs `launch.tokenize` (`--crops=random --crops_per_clip=1`: one 0.64-s
crop per clip, the tiny DPD's window, so every clip is read whole for one forward row) on each as a
child process, recording its peak RSS (`wait4`'s ru_maxrss) and wall time. Figures:
- peak RSS at 100 and at 1,000 clips and their ratio (the job streams: it should stay within 20 %);
- crops per second on 8 fake CPU devices and on 1, steady state: (crops at 1,000 − crops at 100) /
  (seconds at 1,000 − seconds at 100), so start-up and compilation cancel out.
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
        runs = {f"{devices}dev_{n}": tokenize_run(data[n], stages, os.path.join(tmp, f"out{devices}_{n}"), devices)
                for devices in (8, 1) for n in sizes}
    small, large = sizes
    rss = {n: runs[f"8dev_{n}"]["peak_rss_mib"] for n in sizes}
    result: dict[str, Any] = {"clips": list(sizes), "runs": runs, "rss_ratio": rss[large] / rss[small]}
    for devices in (8, 1):
        a, b = runs[f"{devices}dev_{small}"], runs[f"{devices}dev_{large}"]
        result[f"crops_per_s_{devices}dev"] = (b["crops"] - a["crops"]) / (b["seconds"] - a["seconds"])
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = ["| devices | clips | crops | wall s | peak RSS MiB |", "|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        devices, clips = name.split("dev_")
        lines.append(f"| {devices} | {clips} | {r['crops']} | {r['seconds']:.1f} | {r['peak_rss_mib']:.0f} |")
    lines += ["", f"peak RSS at {result['clips'][1]} / at {result['clips'][0]} clips (8 devices): "
              f"{result['rss_ratio']:.3f}",
              f"steady-state crops/s: 8 devices {result['crops_per_s_8dev']:.1f}, "
              f"1 device {result['crops_per_s_1dev']:.1f}"]
    return "\n".join(lines)


def main() -> None:
    quick_cli("tokenize_memory", __doc__, "50 and 200 clips", run, markdown)


if __name__ == "__main__":
    main()
