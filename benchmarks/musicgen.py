"""MusicGen decoding speed against the weight-read floor (DESIGN §6).

`python -m benchmarks.musicgen [--quick]` prints a Markdown table and writes
benchmarks/results/musicgen.json. One row per preset: a single-window `generate` at batch 1 with
classifier-free guidance (so every decoder call runs 2 rows: conditional and unconditional), top-k
250, temperature 1, the delay pattern; compiled beforehand, median of repeats. `ms_per_step` is the
wall time divided by the sampler's own count of decoder forward passes (prefill included), so it is
the time to emit one pattern step = K = 4 codes per row; `frames_per_s` and `realtime_x` (audio
seconds per second at the codec's 50 Hz) follow from the frames generated.

A step must read every decoder weight once (the text encoder runs once per window and is left
out), so `floor_ms` = decoder weight bytes / memory bandwidth, measured in the same run
(`benchmarks.limits.memory_bandwidth`); `read_floor_ms` adds the preallocated self-attention KV
cache and the cached text keys/values of both rows. On CPU the presets run in float32.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from benchmarks.limits import memory_bandwidth
from benchmarks.report import markdown_table, median_time, quick_cli
from configs import musicgen as musicgen_config
from melody_jax.pipelines.musicgen_sampling import generate
from melody_jax.tasks.musicgen import MusicGenTask
from melody_jax.text.byte_tokenizer import tokenize

COLUMNS = ["preset", "frames", "forward_passes", "params_m", "decoder_mb", "ms_per_step", "frames_per_s",
           "realtime_x", "floor_ms", "ratio_to_floor", "read_floor_ms", "ratio_to_read_floor"]


def measure(preset: str, num_frames: int, bandwidth: float, repeats: int) -> dict:
    config = musicgen_config.get_config(preset)
    if jax.default_backend() == "cpu":
        config.model.dtype = "float32"
    task = MusicGenTask(config)
    model, pattern, m = task.model, task.pattern, config.model
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.key(0))
    tokens, mask = tokenize(["an upbeat pop song with drums and a bright piano melody"], m.max_text_length)
    chroma = jax.random.uniform(jax.random.key(1), (1, m.melody_frames, 12)) if m.use_melody else None
    run = lambda: generate(model, params, pattern, tokens, mask, num_frames, jax.random.key(2),  # noqa: E731
                           chroma=chroma, cfg_scale=config.sample.cfg_scale, top_k=config.sample.top_k,
                           temperature=config.sample.temperature)
    t0 = time.perf_counter()
    out = run()
    jax.block_until_ready(out.codes)
    first_call_s = time.perf_counter() - t0
    seconds = median_time(lambda: run().codes, warmup=1, repeats=repeats)
    per_step = seconds / out.forward_passes

    itemsize = jnp.dtype(m.dtype).itemsize
    total = sum(x.size for x in jax.tree.leaves(params))
    text = sum(x.size for x in jax.tree.leaves(params["text_encoder"]))
    table = params["embedding"]
    decoder = (total - text - table.size + 2 * table.shape[0] * table.shape[2]) * itemsize  # 2 rows × K gathered
    rows, head_dim = 2, m.embed_dim // m.num_heads
    positions = (m.melody_frames if m.use_melody else 0) + pattern.num_steps(num_frames)
    kv = 2 * m.num_layers * rows * m.num_heads * head_dim * (positions + m.max_text_length) * itemsize
    return {"preset": preset, "frames": num_frames, "forward_passes": out.forward_passes, "dtype": m.dtype,
            "params_m": total / 1e6, "decoder_mb": decoder / 1e6, "kv_cache_mb": kv / 1e6,
            "first_call_s": first_call_s, "ms_per_step": per_step * 1e3, "frames_per_s": num_frames / seconds,
            "realtime_x": num_frames / seconds / config.data.frame_rate,
            "floor_ms": decoder / bandwidth * 1e3, "ratio_to_floor": per_step * bandwidth / decoder,
            "read_floor_ms": (decoder + kv) / bandwidth * 1e3,
            "ratio_to_read_floor": per_step * bandwidth / (decoder + kv)}


def run(quick: bool = False) -> dict:
    bandwidth = memory_bandwidth()
    if quick:
        rows = [measure("small", 50, bandwidth, 2)]
    else:
        presets = ("small",) if jax.default_backend() == "cpu" else ("small", "base")
        rows = [measure(p, 500, bandwidth, 3) for p in presets]
    return {"memory_bandwidth_bytes_per_s": bandwidth, "batch": 1, "cfg": True, "rows": rows}


def markdown(result: dict) -> str:
    return (f"memory bandwidth (jitted in-place copy): {result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s; "
            "batch 1 with CFG (2 rows per decoder call), delay pattern, top-k 250\n\n"
            + markdown_table(result["rows"], COLUMNS))


def main() -> None:
    quick_cli("musicgen", __doc__, "small preset only, 1 s (50 frames)", run, markdown)


if __name__ == "__main__":
    main()
