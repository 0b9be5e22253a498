"""Peak memory of preparing one long file (issue 27, case 17): it must not grow with the file's length.

`python -m benchmarks.prepare_memory [--minutes=5,40] [--quick]` writes one synthetic 44.1-kHz stereo
16-bit WAV per length into a temporary folder (block by block: the script never holds a whole file either),
prepares each in a fresh subprocess (`--source=folder`, 24 kHz, 30-s clips, the CLI's defaults) and reports
that process's peak RSS (getrusage ru_maxrss), its RSS once everything is imported and before the first
file is opened, and the wall and CPU time. Prints a Markdown table and writes
benchmarks/results/prepare_memory.json.
`--quick`: 1 and 4 minutes.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

from benchmarks.report import write_json

SOURCE_RATE = 44100
BLOCK = SOURCE_RATE * 10


def write_long_wav(path: str, minutes: float) -> None:
    """Two slowly gliding tones (continuous phase across blocks) at -10 dBFS, stereo, 16-bit."""
    total, phase = int(minutes * 60 * SOURCE_RATE), np.zeros(2)
    with sf.SoundFile(path, "w", SOURCE_RATE, 2, "PCM_16") as f:
        for start in range(0, total, BLOCK):
            t = (start + np.arange(min(BLOCK, total - start))) / SOURCE_RATE
            hz = np.stack([220 + 110 * np.sin(2 * np.pi * t / 37), 330 + 60 * np.sin(2 * np.pi * t / 53)], axis=1)
            angle = phase + 2 * np.pi * np.cumsum(hz, axis=0) / SOURCE_RATE
            phase = angle[-1]
            f.write((0.3 * np.sin(angle)).astype(np.float32))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def child(folder: str, out: str) -> None:
    """Runs in the measured subprocess: prepare `folder` into `out`, print one JSON line."""
    from data_pipeline.builder import PrepareSettings, prepare

    imported = _rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    report = prepare(PrepareSettings(source="folder", input=folder), out, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    print(json.dumps({"rss_after_imports_mb": imported, "peak_rss_mb": peak,
                      "prepare_s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu,
                      "examples": report.examples_written, "hours": report.hours_prepared}))


def measure(minutes: float, tmp: str) -> dict:
    folder, out = os.path.join(tmp, f"in_{minutes:g}"), os.path.join(tmp, f"out_{minutes:g}")
    os.makedirs(folder)
    write_long_wav(os.path.join(folder, "long.wav"), minutes)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "benchmarks.prepare_memory", "--child", folder, out],
                          capture_output=True, text=True, cwd=root)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(minutes=minutes, file_mb=os.path.getsize(os.path.join(folder, "long.wav")) / 2**20,
                  whole_file_float32_at_24khz_mb=minutes * 60 * 24000 * 4 / 2**20)
    return result


def markdown(rows: list[dict]) -> str:
    lines = ["| file | WAV size | the file as float32 at 24 kHz | RSS after imports | peak RSS | clips | wall | CPU |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['minutes']:g} min | {r['file_mb']:.0f} MB | {r['whole_file_float32_at_24khz_mb']:.0f} MB | "
              f"{r['rss_after_imports_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB | {r['examples']} | "
              f"{r['prepare_s']:.1f} s | {r['cpu_s']:.1f} s |"
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", default="5,40", help="comma-separated file lengths")
    parser.add_argument("--quick", action="store_true", help="1 and 4 minutes")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    lengths = [1.0, 4.0] if args.quick else [float(m) for m in args.minutes.split(",")]
    with tempfile.TemporaryDirectory(prefix="prepare_memory_") as tmp:
        rows = [measure(m, tmp) for m in lengths]
    print(markdown(rows))
    print("wrote", write_json("prepare_memory", {"rows": rows}))


if __name__ == "__main__":
    main()
