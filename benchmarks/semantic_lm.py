"""Semantic LM decoding speed against the memory-bandwidth floor (DESIGN §4.4).

`python -m benchmarks.semantic_lm [--quick]` prints a Markdown table and writes
benchmarks/results/semantic_lm.json. Per-token time is one jitted `sample` call (prefill of the 12
MuLan tokens, then N tokens in a `lax.scan`, compiled beforehand) divided by N, median of repeats.
A decode step must read every weight once, so the floor is bytes of all weights / memory bandwidth,
the bandwidth measured in the same run with a large jitted in-place copy. Two more bounds:
`read_floor_ms` counts what a step really has to read (the weights without the embedding table, of
which B rows are gathered, plus the whole preallocated KV cache), and `compute_floor_ms` is the
step's matmul FLOPs (2·B per matmul weight) at `benchmarks.limits.matmul_peak`, measured in the
same run; at batch 8 in float32 a CPU step is nearly compute-bound. `ratio_to_bound` compares with
the larger of those two. On CPU the presets run in float32 (bfloat16 matmuls are emulated there).
A `guided` row samples with classifier-free guidance (`sample.lm_cfg`): each of its B rows runs beside its
null-prefix row, so its bounds count 2·B rows.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from flax import linen as nn

from benchmarks.limits import matmul_peak, memory_bandwidth
from benchmarks.report import chosen_presets, markdown_table, median_time, quick_cli
from configs import semantic_lm as semantic_lm_config
from melody_jax.models.semantic_lm import NULL_CODE
from melody_jax.pipelines.lm_sampling import sample
from melody_jax.tasks.semantic_lm import SemanticLMTask

COLUMNS = ["preset", "batch", "guided", "tokens", "params_m", "weights_mb", "ms_per_token", "tokens_per_s", "floor_ms",
           "ratio_to_floor", "read_floor_ms", "compute_floor_ms", "ratio_to_bound"]


def measure(preset: str, batch: int, num_tokens: int, bandwidth: float, peak: float, repeats: int,
            guided: bool = False) -> dict:
    config = semantic_lm_config.get_config(preset)
    if jax.default_backend() == "cpu":
        config.model.dtype = "float32"
    config.model.cfg_dropout = 0.1 if guided else 0.0  # an LM with the null prefix's rows
    task = SemanticLMTask(config)
    model = task.model
    params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.key(0))
    prefix = jax.random.randint(jax.random.key(1), (batch, model.num_prefix), 0, model.prefix_codebook_size)
    guidance = dict(null_prefix=jnp.full_like(prefix, NULL_CODE), cfg_scale=3.0) if guided else {}
    run = lambda: sample(model, params, prefix, num_tokens, jax.random.key(2), **guidance)  # noqa: E731
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    first_call_s = time.perf_counter() - t0
    per_token = median_time(run, warmup=1, repeats=repeats) / num_tokens

    leaves, rows = jax.tree.leaves(params), batch * (2 if guided else 1)
    weights = sum(x.nbytes for x in leaves)
    table = params["decoder"]["embedding"]
    head_dim = model.embed_dim // model.num_heads
    cache = 2 * model.num_layers * rows * model.num_heads * (model.num_prefix + num_tokens) * head_dim * 4
    read = weights - table.nbytes + rows * table.nbytes // table.shape[0] + cache
    matmul_weights = sum(x.size for x in leaves if x.ndim >= 2) - table.size
    read_floor, compute_floor = read / bandwidth, 2 * rows * matmul_weights / peak
    return {"preset": preset, "batch": batch, "guided": guided, "tokens": num_tokens, "dtype": config.model.dtype,
            "params_m": sum(x.size for x in leaves) / 1e6, "weights_mb": weights / 1e6, "kv_cache_mb": cache / 1e6,
            "first_call_s": first_call_s, "ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token,
            "floor_ms": weights / bandwidth * 1e3, "ratio_to_floor": per_token * bandwidth / weights,
            "read_floor_ms": read_floor * 1e3, "compute_floor_ms": compute_floor * 1e3,
            "ratio_to_bound": per_token / max(read_floor, compute_floor)}


def run(quick: bool = False) -> dict:
    bandwidth, peak = memory_bandwidth(), matmul_peak()
    presets, num_tokens, repeats = (("small",), 64, 3) if quick else (("small", "base"), 250, 5)
    rows = [measure(p, b, num_tokens, bandwidth, peak, repeats, guided) for p in chosen_presets(presets)
            for b, guided in ((1, False), (8, False), (8, True))]
    return {"memory_bandwidth_bytes_per_s": bandwidth, "matmul_peak_flops_per_s": peak, "rows": rows}


def markdown(result: dict) -> str:
    return (f"memory bandwidth (jitted in-place copy): {result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, "
            f"matmul peak (float32): {result['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s\n\n"
            + markdown_table(result["rows"], COLUMNS))


def main() -> None:
    quick_cli("semantic_lm", __doc__, "small preset only, 64 tokens", run, markdown)


if __name__ == "__main__":
    main()
