"""Training-step throughput of the toy LM (the decoder of DESIGN §4.4) and its MFU.

FLOPs come from XLA's cost analysis of the compiled, sharded step and are cross-checked with the
analytic decoder count 6·N_matmul·tokens + 12·layers·T²·d (attention), per step. MFU is measured
against the matmul peak of the same machine, measured in the same run.
"""
from __future__ import annotations

import time

import jax

from benchmarks.limits import matmul_peak
from benchmarks.report import chosen_presets, compiled_flops, markdown_table, median_time, quick_cli
from melody_jax.tasks.toy_lm import ToyLMTask
from melody_jax.training.config import apply_overrides
from melody_jax.training.loop import guarded, init_sharded_state, sharded_abstract_state
from melody_jax.training.sharding import activate, make_mesh, rules_from_config


def analytic_decoder_flops(model, batch: int, seq_len: int) -> float:
    """Train-step FLOPs (forward + backward = 3× forward) of DecoderLM on [batch, seq_len] tokens."""
    d, layers = model.embed_dim, model.num_layers
    matmul_params = layers * (4 * d * d + 3 * d * model.mlp_dim) + d * model.vocab_size
    return 3 * batch * (2 * seq_len * matmul_params + 4 * layers * seq_len * seq_len * d)


def measure(preset: str, *, repeats: int, overrides: dict[str, str] | None = None) -> dict:
    from configs import toy_lm

    config = apply_overrides(toy_lm.get_config(preset), overrides or {})
    task = ToyLMTask(config)
    mesh, rules = make_mesh(config.mesh), rules_from_config(config.sharding_rules)
    with activate(mesh, rules):
        rng = jax.random.key(0)
        _, shardings = sharded_abstract_state(task, mesh, rules, rng)
        state = init_sharded_state(task, shardings, rng)
        batch = next(task.train_iterator(mesh))
        step = jax.jit(guarded(task, rng), out_shardings=(shardings, None), donate_argnums=(0,))
        t0 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        holder = {"state": state}

        def run():
            holder["state"], metrics = compiled(holder["state"], batch)
            return metrics["loss"]

        seconds = median_time(run, repeats=repeats)
    seq = config.data.seq_len - 1  # the model sees tokens[:, :-1]
    return {"preset": preset, "batch": config.train.batch_size, "seq_len": seq,
            "compile_s": compile_s, "step_s": seconds,
            "examples_per_s": config.train.batch_size / seconds,
            "xla_flops": compiled_flops(compiled),
            "analytic_flops": analytic_decoder_flops(task.model, config.train.batch_size, seq)}


def run(quick: bool = False) -> dict:
    peak = matmul_peak(repeats=3 if quick else 10)
    rows = []
    for preset in chosen_presets(("tiny", "small") if quick else ("tiny", "small", "base")):
        row = measure(preset, repeats=3 if quick else 10)
        row["flops_ratio_xla_over_analytic"] = row["xla_flops"] / row["analytic_flops"]
        row["achieved_flops_per_s"] = row["analytic_flops"] / row["step_s"]
        row["mfu"] = row["achieved_flops_per_s"] / peak
        rows.append(row)
    return {"matmul_peak_flops_per_s": peak, "rows": rows}


def markdown(result: dict) -> str:
    return (f"matmul peak (float32, measured): {result['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s\n\n"
            + markdown_table(result["rows"], ["preset", "batch", "seq_len", "compile_s", "step_s", "examples_per_s",
                                              "analytic_flops", "flops_ratio_xla_over_analytic", "mfu"]))


def main() -> None:
    quick_cli("train_step", __doc__, "a shorter run", run, markdown)


if __name__ == "__main__":
    main()
