"""The benchmark harness: forward-pass counts, XLA FLOP counts against analytic ones, the JSON a run
writes, the persistent compilation cache, and the PyTorch peer's skip when its environment is absent.

Sections run in-process on the `tiny` presets with a small matmul peak, so the test checks the
plumbing and the counting, not this machine's speed.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import forward_passes as fp
from benchmarks import limits, peer, run
from benchmarks import train_step as train_step_bench
from benchmarks.report import compiled_flops, machine, partitions, write_json
from melody_jax.models.transformer import DecoderBlock

pytestmark = pytest.mark.slow  # benchmark sections run

MACHINE_FIELDS = {"cpu", "cores", "device_kind", "platform", "devices", "jax", "flax"}
TRAIN_COLUMNS = {"preset", "batch", "seq_len", "compile_s", "step_s", "examples_per_s", "xla_flops", "analytic_flops",
                 "flops_ratio_xla_over_analytic", "achieved_flops_per_s", "mfu"}


def test_musiclm_passes_per_stage():
    """25 semantic + 4·50 coarse + 8·50 fine tokens per second, one pass each."""
    assert fp.musiclm_passes(10) == {"semantic": 250, "coarse": 2000, "fine": 4000, "total": 6250}
    assert fp.musiclm_passes(30)["total"] == 3 * 6250


def test_melody_and_musicgen_passes():
    assert fp.melody_passes(10, 20) == {"lm": 250, "dpd": 20, "windows": 1, "total": 270}
    assert fp.melody_passes(10, 20, cfg_batched=False)["dpd"] == 40  # CFG as two calls
    # 30 s in 10 s windows keeping 4 s: 1 + ceil(20 / 6) = 5 windows, each 20 DPD passes.
    assert fp.melody_passes(30, 20, window_s=10, keep_s=4) == {"lm": 750, "dpd": 100, "windows": 5, "total": 850}
    assert fp.musicgen_passes(10) == {"steps": 503, "windows": 1, "total": 503}  # T + 3 under the delay pattern
    assert fp.musicgen_passes(30, window_s=30)["steps"] == 1503
    assert fp.musicgen_passes(60, window_s=30, keep_s=12)["steps"] == 3000 + 3 * 3  # 3 windows, each drains 3
    with pytest.raises(ValueError):
        fp.num_windows(30, 10, keep_s=10)


def test_paper_reduction_at_ten_seconds():
    """250 LM + 20 DPD passes against MusicLM's 6250 is the paper's 95.7% to the printed digit."""
    row = fp.reduction(10, dpd_steps=20)
    assert round(row["reduction"], 3) == row["paper_reduction"] == 0.957
    # Counted linearly in time, 30 s saves the same fraction, short of the paper's 99.6% (see module doc).
    assert fp.reduction(30)["reduction"] == pytest.approx(1 - 770 / 18750)


def test_compiled_flops_of_a_matmul_is_two_mnk():
    m, k, n = 64, 128, 96
    compiled = jax.jit(jnp.matmul).lower(jnp.zeros((m, k)), jnp.zeros((k, n))).compile()
    assert compiled_flops(compiled) == 2 * m * n * k


def test_compiled_flops_sums_the_partitions_of_a_sharded_matmul():
    """cost_analysis sees one of the 8 row shards; compiled_flops reports the whole product."""
    from jax.sharding import NamedSharding, PartitionSpec

    m, k, n = 64, 128, 96
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    x = jax.device_put(jnp.zeros((m, k)), NamedSharding(mesh, PartitionSpec("data")))
    compiled = jax.jit(jnp.matmul).lower(x, jnp.zeros((k, n))).compile()
    assert partitions(compiled) == jax.device_count() == 8
    assert compiled_flops(compiled) == 2 * m * n * k


def test_compiled_flops_of_a_transformer_layer_matches_its_matmuls():
    """XLA counts the matmuls (q, k, v, o, SwiGLU's three, scores and values) plus elementwise work:
    at d 256, T 128 that extra (norms, softmax, rotary, gating) is under 2% of the matmul count."""
    b, t, d, heads, f = 2, 128, 256, 4, 1024
    block = DecoderBlock(num_heads=heads, mlp_dim=f)
    x = jnp.zeros((b, t, d))
    params = jax.eval_shape(block.init, jax.random.key(0), x)  # shapes suffice to compile
    compiled = jax.jit(block.apply).lower(params, x).compile()
    analytic = 2 * b * t * (4 * d * d + 3 * d * f) + 2 * 2 * b * t * t * d
    assert 1.0 <= compiled_flops(compiled) / analytic < 1.02


def test_peer_reports_skipped_without_its_environment(tmp_path):
    result = peer.run(quick=True, venv=str(tmp_path / "no-such-venv"))
    assert result["skipped"] == "peer environment absent: run make bench-peer"
    assert peer.markdown(result) == "skipped: peer environment absent: run make bench-peer"


def test_harness_writes_every_field_on_tiny_presets(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_PRESETS", "tiny")
    monkeypatch.setenv("MELODY_PEER_VENV", str(tmp_path / "absent"))
    small_peak = functools.partial(limits.matmul_peak, n=256, inner=2)
    monkeypatch.setattr(train_step_bench, "matmul_peak", lambda repeats: small_peak(repeats=1))
    results = run.run_sections(["train_step", "forward_passes", "peer", "no_such_section"], quick=True)
    path = write_json("all", {"quick": True, "sections": results}, directory=str(tmp_path))
    with open(path) as f:
        written = json.load(f)

    assert MACHINE_FIELDS <= set(written["machine"]) and written["machine"] == machine()
    assert written["machine"]["cores"] >= 1 and written["machine"]["jax"] == jax.__version__
    sections = written["sections"]
    assert sections["no_such_section"] == {"skipped": "module benchmarks.no_such_section does not exist yet"}
    assert sections["peer"]["skipped"] == "peer environment absent: run make bench-peer"

    train = sections["train_step"]
    assert [row["preset"] for row in train["rows"]] == ["tiny"]
    row = train["rows"][0]
    assert TRAIN_COLUMNS <= set(row)
    assert row["analytic_flops"] == train_step_bench.analytic_decoder_flops(
        _toy_model(), row["batch"], row["seq_len"])
    # XLA's count of the whole train step (optimizer, softmax, norms included) sits above the matmul count.
    assert 1.0 <= row["flops_ratio_xla_over_analytic"] < 1.2  # 1.10 at the tiny sizes
    assert row["step_s"] > 0 and row["mfu"] > 0 and train["matmul_peak_flops_per_s"] > 0
    assert train["compiles"] >= 1 and 0 < train["compile_seconds"] < train["section_seconds"]

    passes = sections["forward_passes"]
    assert passes["compiles"] == 0 and passes["compile_seconds"] == 0.0
    assert {"seconds", "dpd_steps", "musiclm", "melody", "musicgen", "reduction"} <= set(passes["rows"][0])


def _toy_model():
    from configs import toy_lm
    from melody_jax.tasks.toy_lm import ToyLMTask

    return ToyLMTask(toy_lm.get_config("tiny")).model


def test_persistent_cache_serves_a_second_compile(tmp_path):
    """After clearing the in-memory caches, the same program comes back from the cache directory."""
    from jax._src import compilation_cache

    previous = jax.config.jax_compilation_cache_dir
    try:
        run.enable_compilation_cache(str(tmp_path / "cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        compilation_cache.reset_cache()
        f = lambda x: jnp.tanh(x @ x.T) * 3.0  # noqa: E731
        x = jnp.ones((8, 8))
        with run.CompileClock() as first:
            jax.jit(f).lower(x).compile()
        jax.clear_caches()
        with run.CompileClock() as second:
            jax.jit(f).lower(x).compile()
        assert (first.cache_hits, second.cache_hits) == (0, 1)
        assert first.count == second.count == 1
        assert any((tmp_path / "cache").iterdir())
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        compilation_cache.reset_cache()


def test_sampling_section_matches_the_musicgen_budget_to_melody():
    """Shapes only (jax.eval_shape): the timing itself runs on the pipeline tests' bundles
    (tests/test_melody_pipeline.py::test_sampling_benchmark_rows)."""
    from benchmarks import sampling

    configs = sampling.melody_configs("small")
    budget = sampling.melody_budget(configs)
    mg = sampling.musicgen_configs("small", budget, configs)
    assert mg["musicgen"].model.embed_dim == configs["semantic_lm"].model.embed_dim
    deeper = sampling._config("musicgen", "small", **{"model.num_layers": mg["musicgen"].model.num_layers + 1,
                                                       **{f"model.{k}": v for k, v in mg["musicgen"].model.items()
                                                          if k not in ("num_layers", "lora")}})
    per_layer = sampling._count(deeper) - sampling._count(mg["musicgen"])
    assert abs(sampling._count(mg["musicgen"]) - budget) <= per_layer / 2 + 1, budget  # the closest layer count
    assert mg["codec"].model.quantizer.codebook_size == mg["musicgen"].model.codebook_size
