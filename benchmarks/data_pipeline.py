"""Data pipeline throughput: synthetic generation, preparation, training input.

`python -m benchmarks.data_pipeline [--quick]` prints a Markdown table and writes
benchmarks/results/data_pipeline.json. Figures:
- synthetic generation: seconds of 24-kHz audio per second of CPU time (× real time per core);
- preparation: prepared hours per wall-clock second, for a folder of 44.1-kHz stereo FLAC files
  (decode + resample to 24 kHz + downmix + write) and for the synthetic source;
- training input: 10-s crops per second at 24 kHz from 12-s clips, global batch 8, including the
  conversion to global jax.Arrays (the target is at least 20 on 2 cores).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import jax
import numpy as np
import soundfile as sf

from benchmarks.report import quick_cli
from data_pipeline.builder import PrepareSettings, prepare
from data_pipeline.input import default_data_config, make_train_iterator
from data_pipeline.synthetic import clip_seed, generate_clip, synthetic_clips
from melody_jax.training.sharding import make_mesh



def bench_synthetic(num_clips: int) -> dict[str, float]:
    start_cpu, start = time.process_time(), time.perf_counter()
    seconds = sum(len(c.audio) / 24000 for _, c in synthetic_clips(num_clips, seed=0, duration_s=10.0, sample_rate=24000))
    cpu, wall = time.process_time() - start_cpu, time.perf_counter() - start
    return {"clips": num_clips, "audio_s": seconds, "x_real_time_per_core": seconds / cpu,
            "x_real_time_wall": seconds / wall}


def bench_prepare_folder(tmp: str, num_files: int) -> dict[str, float]:
    folder = os.path.join(tmp, "flac")
    os.makedirs(folder)
    for i in range(num_files):  # 30-s stereo 44.1-kHz files (setup, not timed)
        mono = generate_clip(clip_seed(1, i), 30.0, 44100).audio
        sf.write(os.path.join(folder, f"{i:04d}.flac"), np.stack([mono, 0.8 * mono], axis=1), 44100, subtype="PCM_16")
    report = prepare(PrepareSettings(source="folder", input=folder), os.path.join(tmp, "prepared_folder"),
                     progress=False)
    return {"files": num_files, "hours": report.hours_prepared, "seconds": report.elapsed_s,
            "prepared_hours_per_s": report.prepared_hours_per_second}


def bench_prepare_synthetic(tmp: str, num_clips: int) -> tuple[str, dict[str, float]]:
    out = os.path.join(tmp, "prepared_synthetic")
    report = prepare(PrepareSettings(source="synthetic", num_clips=num_clips, clip_seconds=12.0), out, progress=False)
    return out, {"clips": num_clips, "hours": report.hours_prepared, "seconds": report.elapsed_s,
                 "prepared_hours_per_s": report.prepared_hours_per_second}


def bench_input(path: str, batches: int) -> dict[str, float]:
    config = default_data_config()
    config.path = path
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    it = make_train_iterator(config, global_batch_size=8, mesh=mesh, seed=0)
    jax.block_until_ready(next(it)["audio"])  # start-up (graph building, first fill) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        jax.block_until_ready(next(it)["audio"])
    elapsed = time.perf_counter() - start
    return {"batches": batches, "global_batch": 8, "devices": jax.device_count(), "crops_per_s": 8 * batches / elapsed}


def run(quick: bool) -> dict[str, Any]:
    """All figures; `quick` uses fewer clips/files (seconds instead of a minute)."""
    n = 4 if quick else 20
    results: dict[str, Any] = {"quick": quick, "cpu_count": os.cpu_count()}
    results["synthetic_generation"] = bench_synthetic(n)
    with tempfile.TemporaryDirectory() as tmp:
        results["prepare_folder_flac_44k_stereo"] = bench_prepare_folder(tmp, n)
        path, results["prepare_synthetic"] = bench_prepare_synthetic(tmp, 2 * n)
        results["training_input"] = bench_input(path, 10 if quick else 50)
    return results


def markdown(results: dict[str, Any]) -> str:
    gen, folder = results["synthetic_generation"], results["prepare_folder_flac_44k_stereo"]
    syn, inp = results["prepare_synthetic"], results["training_input"]
    rows = [
        ("synthetic generation (10-s clips, 24 kHz)", f"{gen['x_real_time_per_core']:.0f}× real time per core"),
        ("prepare: folder of 30-s 44.1-kHz stereo FLAC → 24 kHz", f"{folder['prepared_hours_per_s']:.3f} prepared h/s"),
        ("prepare: synthetic source (12-s clips)", f"{syn['prepared_hours_per_s']:.3f} prepared h/s"),
        (f"training input (10-s crops, batch 8, {inp['devices']} device(s))", f"{inp['crops_per_s']:.0f} crops/s"),
    ]
    lines = ["| data pipeline | throughput |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines) + f"\n\n(CPU cores: {results['cpu_count']}; quick={results['quick']})"


def main() -> None:
    quick_cli("data_pipeline", __doc__, "fewer clips and files", run, markdown)


if __name__ == "__main__":
    main()
