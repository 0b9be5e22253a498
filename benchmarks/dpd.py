"""One DPD forward pass on 10 s of latents (L = 2500, T_ST = 250) at batch 1: time, FLOPs, MFU.

`python -m benchmarks.dpd [--quick]` (quick: the `small` sizes only; else `small` and `base`).
FLOPs come from XLA's cost analysis of the compiled forward and are cross-checked by an analytic
count of its matmuls (attention, SRU, FFN, embeddings); MFU = analytic FLOPs / time / the matmul
peak of the same machine, measured in the same run (benchmarks.limits). One forward is one
conditional velocity call: a sampler with CFG makes 2× this per step (both branches in one batch).
"""
from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks.limits import matmul_peak, memory_bandwidth
from benchmarks.report import chosen_presets, compiled_flops, markdown_table, median_time, write_json
from melody_jax.models.dpd import DPD
from melody_jax.nn.segment import num_segments
from melody_jax.tasks.dpd import DPDTask

LENGTH, TOKENS = 2500, 250  # 10 s at 250 Hz, 25 Hz
COLUMNS = ["preset", "dtype", "params_M", "length", "compile_s", "forward_s", "audio_s_per_s", "analytic_flops",
           "xla_flops", "flops_ratio_xla_over_analytic", "mfu"]


def analytic_forward_flops(model: DPD, batch: int, length: int, tokens: int) -> float:
    """2·MACs of every matmul in one forward (no uncond branch); elementwise work is not counted."""
    d, f, a, c = model.hidden_dim, model.mlp_dim, model.angle_dim, model.latent_dim
    k, s = model.segment_length, num_segments(length, model.segment_length)
    flops = length * (2 * a * d + 2 * d * d)  # angle embedding MLP
    flops += tokens * 4 * d * d  # token embedding MLP
    flops += length * 4 * c * d  # input and output projections
    for merge in model.resolved_merge_lengths():
        columns = merge * s  # positions the coarse path sees
        layer = columns * (8 * d * d + 4 * d * d + 4 * d * f)  # self q,k,v,o + cross q,o + FFN
        layer += tokens * 4 * d * d  # cross-attention keys and values, once per example
        layer += merge * 4 * s * s * d + 4 * columns * tokens * d  # self / cross scores and values
        flops += model.roformer_layers * layer
        flops += s * 4 * d * d  # FiLM projection, one per segment
        flops += s * k * 2 * 16 * d * d  # two BiSRUs: 2 × (2 directions × D→3D + 2D→D)
    return float(batch * flops)


def measure(preset: str, dtype: str, repeats: int) -> dict[str, Any]:
    from configs import dpd as dpd_config

    config = dpd_config.get_config(preset)
    config.model.dtype = dtype
    model = DPDTask(config).model
    keys = jax.random.split(jax.random.key(0), 3)
    z = jax.random.normal(keys[0], (1, LENGTH, model.latent_dim))
    delta = jax.random.uniform(keys[1], (1, LENGTH), maxval=jnp.pi / 2)
    tokens = jax.random.randint(keys[2], (1, TOKENS), 0, model.vocab_size)
    params = jax.jit(model.init)(jax.random.key(1), z, delta, tokens)
    t0 = time.perf_counter()
    forward = jax.jit(model.apply).lower(params, z, delta, tokens).compile()
    compile_s = time.perf_counter() - t0
    seconds = median_time(lambda: forward(params, z, delta, tokens), repeats=repeats)
    return {"preset": preset, "dtype": dtype, "params_M": model.param_count() / 1e6, "length": LENGTH,
            "compile_s": compile_s, "forward_s": seconds, "audio_s_per_s": LENGTH / 250 / seconds,
            "xla_flops": compiled_flops(forward),
            "analytic_flops": analytic_forward_flops(model, 1, LENGTH, TOKENS)}


def run(quick: bool, dtype: str = "float32") -> dict[str, Any]:
    """Measures the ceilings, then each preset; `quick` keeps to `small` and fewer repeats."""
    repeats = 3 if quick else 10
    peak = matmul_peak(jnp.dtype(dtype), repeats=repeats)
    rows = []
    for preset in chosen_presets(("small",) if quick else ("small", "base")):
        row = measure(preset, dtype, repeats)
        row["flops_ratio_xla_over_analytic"] = row["xla_flops"] / row["analytic_flops"]
        row["achieved_flops_per_s"] = row["analytic_flops"] / row["forward_s"]
        row["mfu"] = row["achieved_flops_per_s"] / peak
        rows.append(row)
    return {"quick": quick, "matmul_peak_flops_per_s": peak,
            "memory_bandwidth_bytes_per_s": memory_bandwidth(repeats=repeats), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    """The ceilings in one line, then one table row per preset."""
    head = (f"matmul peak ({result['rows'][0]['dtype']}): {result['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s; "
            f"memory bandwidth: {result['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s\n\n")
    return head + markdown_table(result["rows"], COLUMNS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes only, fewer repeats")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype of the model and of the matmul peak")
    args = parser.parse_args()
    result = run(args.quick, args.dtype)
    print(markdown(result))
    print("wrote", write_json("dpd", result))


if __name__ == "__main__":
    main()
