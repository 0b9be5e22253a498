"""Converted public MusicGen vs transformers on the same weights (issue 21): decode speed and memory.

`python -m benchmarks.hf_musicgen [--shapes tiny,small] [--batches 1,4] [--seconds 10]` (needs the
peer environment, benchmarks/peers/.venv: `make bench-peer`). Per shape, the PyTorch peer
(benchmarks/peers/hf_musicgen.py) builds a random-weight `MusicgenForConditionalGeneration` (T5 text
encoder, EnCodec 32 kHz, the decoder at that shape) and saves it as a checkpoint directory; our side
converts that directory (`melody_jax.convert`) and both generate from the same weights: 10 s of audio
(500 frames, 503 delay-pattern steps), CFG 3 (each call runs conditional + unconditional rows),
top-k 250, temperature 1, random text ids, at each batch size, with as many threads as this process
may use (torch threads = XLA's cores). Shapes: `tiny` (configs/musicgen.py's tiny decoder, a 1-layer
T5) and `small` (musicgen-small: 24 × 1024, 16 heads, FFN 4096, 4 × 2048 codes, T5-base).

Per row: `lm_ms_per_step` (the LM loop: text encoder + prefill + steps, divided by the steps; ours:
compiled beforehand, the median of repeats), `floor_ms` = the bytes a step must read — every decoder
weight once, less the embedding tables (4 gathered rows) and the cross-attention key/value
projections (applied once, then cached) — over the memory bandwidth measured in this run
(`benchmarks.limits`), `read_floor_ms` adding the self-attention KV cache and the cached text
keys/values, `rtf` = seconds of audio per second end to end (LM + codec decoding),
`per_generated_s_x` = transformers' seconds per generated second over ours (LM + codec), and each
side's peak RSS (the peer: build/load + generate; ours: conversion + generate, one process for all
rows). On CPU both sides run float32; `cpu_kernel` says whether our decode steps used the few-row
CPU kernel (melody_jax/nn/skinny.py) rather than XLA's dot.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from typing import Any

import jax
import numpy as np

from benchmarks.limits import memory_bandwidth
from benchmarks.peer import decoder_sizes, peer_python, run_peer, threads
from benchmarks.report import markdown_table, median_time, write_json

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "hf",
                         "musicgen", "tokenizer.json")
SMALL = {"layers": 24, "d_model": 1024, "heads": 16, "ffn": 4096, "codebook_size": 2048, "num_codebooks": 4,
         "text_layers": 12, "text_d_model": 768, "text_heads": 12, "text_ffn": 3072}  # musicgen-small, t5-base
TEXT_LENGTH = 12
COLUMNS = ["shape", "batch", "side", "lm_ms_per_step", "floor_ms", "x_floor", "read_floor_ms", "x_read_floor",
           "codec_decode_s", "rtf", "peak_rss_gib", "per_generated_s_x"]


def shape_sizes(shape: str) -> dict[str, Any]:
    if shape == "small":
        return dict(SMALL)
    sizes = {k: v for k, v in decoder_sizes(shape).items() if k != "sizes_from"}
    return {**sizes, "text_layers": 1}


def step_bytes(params: dict, m, rows: int, text_length: int, steps: int) -> tuple[int, int]:
    """(weights a decode step reads, + its KV cache and cached text keys/values), float32 bytes."""
    leaves = lambda tree: sum(int(np.size(x)) for x in jax.tree.leaves(tree))  # noqa: E731
    once = ("text_encoder", "text_projection", "melody_proj", "embedding")
    weights = leaves({k: v for k, v in params.items() if k not in once})
    weights -= sum(leaves({n: layer["cross_attn"][n] for n in ("key", "value")})
                   for name, layer in params.items() if name.startswith("layers_") and "cross_attn" in layer)
    weights += rows * m.num_codebooks * m.embed_dim  # the gathered embedding rows
    cache = 2 * m.num_layers * rows * m.embed_dim * (steps + text_length)
    return 4 * weights, 4 * (weights + cache)


def measure_ours(checkpoint: str, batches: list[int], frames: int, bandwidth: float, repeats: int) -> list[dict]:
    from melody_jax.convert.checkpoint_dir import read_checkpoint
    from melody_jax.convert.hf_musicgen import musicgen_from_hf
    from melody_jax.models import codec
    from melody_jax.nn import skinny
    from melody_jax.pipelines.musicgen_sampling import generate
    from melody_jax.tasks.musicgen import MusicGenTask

    converted = musicgen_from_hf(read_checkpoint(checkpoint))
    task = MusicGenTask(converted.musicgen_config)
    model, pattern, m = task.model, task.pattern, converted.musicgen_config.model
    params = jax.device_put(converted.musicgen_params)
    codec_model = codec.build(converted.codec_config.model)
    codec_vars = jax.device_put({"params": converted.codec_params["generator"],
                                 **converted.codec_params["generator_state"]})
    decode = jax.jit(lambda v, c: codec.decode(v, c, codec_model))
    del converted
    steps = pattern.num_steps(frames)
    rows = []
    for batch in batches:
        ids = np.random.default_rng(1).integers(2, m.text_vocab_size, (batch, TEXT_LENGTH)).astype(np.int32)
        mask = np.ones_like(ids, bool)
        run = lambda: generate(model, params, pattern, ids, mask, frames, jax.random.key(2),  # noqa: E731
                               cfg_scale=3.0, top_k=250, temperature=1.0)
        t0 = time.perf_counter()
        out = run()
        jax.block_until_ready(out.codes)
        first_call_s = time.perf_counter() - t0
        cpu0 = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        seconds = median_time(lambda: run().codes, warmup=0, repeats=repeats)
        cpu_s = (sum(resource.getrusage(resource.RUSAGE_SELF)[:2]) - cpu0) / repeats
        codec_s = median_time(lambda: decode(codec_vars, out.codes), warmup=1, repeats=repeats)
        weights, with_cache = step_bytes(params, m, 2 * batch, TEXT_LENGTH, steps)
        per_step = seconds / steps
        rows.append({"side": "ours", "batch": batch, "steps": steps, "forward_passes": out.forward_passes,
                     "first_call_s": first_call_s, "lm_seconds": seconds, "cpu_s": cpu_s,
                     "lm_ms_per_step": per_step * 1e3, "codec_decode_s": codec_s,
                     "floor_ms": weights / bandwidth * 1e3, "x_floor": per_step * bandwidth / weights,
                     "read_floor_ms": with_cache / bandwidth * 1e3, "x_read_floor": per_step * bandwidth / with_cache,
                     "rtf": frames / 50 / (seconds + codec_s),
                     "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                     "loadavg_1m": os.getloadavg()[0], "cpu_kernel": skinny.available()})
    return rows


def peer_row(result: dict, ours: dict, frames: int) -> dict:
    if "error" in result:
        return {"side": "transformers", "batch": ours["batch"], "error": result["error"]}
    per_step = result["lm_seconds"] / result["steps"]
    return {**result, "side": "transformers", "lm_ms_per_step": per_step * 1e3,
            "floor_ms": ours["floor_ms"], "x_floor": per_step * 1e3 / ours["floor_ms"],
            "read_floor_ms": ours["read_floor_ms"], "x_read_floor": per_step * 1e3 / ours["read_floor_ms"],
            "rtf": frames / 50 / result["seconds"]}


def run(shapes: list[str], batches: list[int], seconds: float, repeats: int, venv: str | None = None,
        keep: str | None = None) -> dict:
    """`keep`: a folder for the checkpoints (one per shape, reused when present, kept), else a temp dir."""
    python = peer_python(venv)
    if not os.path.exists(python):
        return {"skipped": "peer environment absent: run make bench-peer"}
    bandwidth, frames, n = memory_bandwidth(), int(round(seconds * 50)), threads()
    out = {"threads": n, "memory_bandwidth_bytes_per_s": bandwidth, "frames": frames, "cfg_scale": 3.0,
           "top_k": 250, "rows": []}
    for shape in shapes:
        sizes = shape_sizes(shape)
        directory = os.path.join(keep, shape) if keep else tempfile.mkdtemp(prefix=f"hf-musicgen-{shape}-")
        try:
            steps = frames + sizes["num_codebooks"] - 1
            peers = [run_peer({**sizes, "checkpoint": directory, "batch": b}, steps, n, python) for b in batches]
            if "error" in peers[0]:
                out["rows"].append({"shape": shape, "side": "transformers", "error": peers[0]["error"]})
                continue
            shutil.copy(TOKENIZER, directory)  # the converter wants the checkpoint's tokenizer (ids are random)
            ours = measure_ours(directory, batches, frames, bandwidth, repeats)
        finally:
            if not keep:
                shutil.rmtree(directory, ignore_errors=True)
        for mine, theirs in zip(ours, peers):
            peer = peer_row(theirs, mine, frames)
            if "rtf" in peer:
                mine["per_generated_s_x"] = mine["rtf"] / peer["rtf"]
                mine["lm_x"] = peer["lm_ms_per_step"] / mine["lm_ms_per_step"]
            out["rows"] += [{"shape": shape, **sizes, **peer}, {"shape": shape, **sizes, **mine}]
    return out


def markdown(result: dict) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return (f"{result['threads']} threads, memory bandwidth {result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"{result['frames']} frames ({result['frames'] / 50:g} s at 50 Hz), CFG 3, top-k 250, float32\n\n"
            + markdown_table(result["rows"], COLUMNS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="tiny,small")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of ours after the compiling one")
    parser.add_argument("--venv", help="the peer environment (default benchmarks/peers/.venv)")
    parser.add_argument("--name", default="hf_musicgen", help="benchmarks/results/<name>.json")
    parser.add_argument("--keep", help="keep (and reuse) the random checkpoints in this folder, one per shape")
    args = parser.parse_args()
    result = run(args.shapes.split(","), [int(b) for b in args.batches.split(",")], args.seconds, args.repeats,
                 args.venv, args.keep)
    print(markdown(result))
    print("wrote", write_json(args.name, result))


if __name__ == "__main__":
    main()
