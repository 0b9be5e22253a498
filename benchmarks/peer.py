"""The PyTorch peer: Hugging Face MusicGen sampling on this CPU, next to our MusicGen path.

`python -m benchmarks.peer [--quick]`. The peer lives in its own virtual environment
(benchmarks/peers/.venv, made by `make bench-peer`; torch and transformers are never dependencies
of melody-jax) and runs as a subprocess, `benchmarks/peers/hf_musicgen.py`, with as many torch
threads as JAX has cores here, batch 1, top-k 250, CFG 3. Its decoder takes the sizes of our
`configs/musicgen.py` preset (quick: `tiny`, 50 steps; full: `small`, i.e. MusicGen-small, 250
steps), so both sides decode the same number of steps of the same shape. Without the environment
the section reports itself skipped; `MELODY_PEER_VENV` points it elsewhere.

Our side comes from `benchmarks.musicgen`: `measure_generation(preset=..., steps=...)` returning
`steps_per_s` where it exists, else its `measure(preset, num_frames, bandwidth, repeats)` for
steps − K + 1 frames (the same number of delay-pattern steps; `ms_per_step` there is seconds per
decoder call). The ratio `ours_over_peer` is steps/s over steps/s; both sides exclude nothing but
the peer's codec decoding (reported as `codec_decode_s`). Our path also feeds its melody prefix
(DESIGN §6), which the HF text-only model lacks. Where the module is missing the peer is reported
alone, and the result says so under `ours`.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.report import chosen_presets, markdown_table, write_json

PEERS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers")
DEFAULT_VENV = os.path.join(PEERS_DIR, ".venv")
SCRIPT = os.path.join(PEERS_DIR, "hf_musicgen.py")
NUM_CODEBOOKS = 4
# Only where configs/musicgen.py is missing: layers, d_model, heads, ffn, codebook size, text (layers, d, heads, ffn)
FALLBACK_SIZES = {"tiny": (2, 64, 4, 128, 64, (1, 64, 4, 128)),
                  "small": (24, 1024, 16, 4096, 2048, (6, 768, 12, 3072))}
COLUMNS = ["preset", "d_model", "layers", "steps", "threads", "seconds", "cpu_s", "codec_decode_s", "steps_per_s",
           "peak_rss_gib", "decoder_params_m", "ours_steps_per_s", "ours_over_peer"]


def threads() -> int:
    """The cores this process may use: what XLA's CPU client uses, so both sides get the same."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peer_python(venv: str | None = None) -> str:
    return os.path.join(venv or os.environ.get("MELODY_PEER_VENV", DEFAULT_VENV), "bin", "python")


def decoder_sizes(preset: str) -> dict[str, Any]:
    """The decoder and text-encoder sizes of our preset, from configs/musicgen.py where it exists."""
    try:
        from configs import musicgen
    except ModuleNotFoundError:
        (layers, d, heads, ffn, vocab, text), codebooks = FALLBACK_SIZES[preset], NUM_CODEBOOKS
        source = "fallback (configs/musicgen.py absent)"
    else:
        m = musicgen.get_config(preset).model
        layers, d, heads, ffn, vocab = m.num_layers, m.embed_dim, m.num_heads, m.mlp_dim, m.codebook_size
        codebooks = m.num_codebooks
        text = (m.text_layers, m.text_embed_dim, m.text_heads, m.text_mlp_dim)
        source = "configs/musicgen.py"
    return {"layers": layers, "d_model": d, "heads": heads, "ffn": ffn, "codebook_size": vocab,
            "num_codebooks": codebooks, "text_layers": text[0], "text_d_model": text[1], "text_heads": text[2],
            "text_ffn": text[3],
            "sizes_from": source}


def run_peer(sizes: dict[str, Any], steps: int, num_threads: int, python: str, timeout_s: float = 3600) -> dict:
    """One subprocess run of hf_musicgen.py; its last stdout line is the JSON result."""
    flags = {k: v for k, v in sizes.items() if k != "sizes_from"}
    cmd = [python, SCRIPT, "--threads", str(num_threads), "--steps", str(steps)]
    cmd += [arg for k, v in flags.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(num_threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        return {"error": f"peer exited with {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_ours(preset: str, steps: int, num_codebooks: int = NUM_CODEBOOKS) -> dict[str, Any]:
    """Our MusicGen path for the same preset and steps, if benchmarks.musicgen offers it; else why not."""
    try:
        module = importlib.import_module("benchmarks.musicgen")
    except ModuleNotFoundError as e:
        return {"missing": f"module {e.name} does not exist: peer reported alone"}
    fn = getattr(module, "measure_generation", None)
    if fn is not None:
        accepted = inspect.signature(fn).parameters
        return fn(**{k: v for k, v in {"preset": preset, "steps": steps, "batch": 1}.items() if k in accepted})
    fn = getattr(module, "measure", None)
    if fn is None or not {"preset", "num_frames", "bandwidth", "repeats"} <= set(inspect.signature(fn).parameters):
        return {"missing": "benchmarks.musicgen offers neither measure_generation(preset, steps) nor "
                           "measure(preset, num_frames, bandwidth, repeats): peer reported alone"}
    from benchmarks.limits import memory_bandwidth

    frames = steps - num_codebooks + 1
    ours = fn(preset=preset, num_frames=frames, bandwidth=memory_bandwidth(), repeats=2)
    return {**ours, "steps_per_s": 1e3 / ours["ms_per_step"]}


def run(quick: bool = False, venv: str | None = None) -> dict[str, Any]:
    """Peer (and, where available, ours) at each chosen preset; skipped without the peer environment."""
    python = peer_python(venv)
    if not os.path.exists(python):
        venv_dir = os.path.dirname(os.path.dirname(python))
        return {"skipped": "peer environment absent: run make bench-peer", "venv": venv_dir}
    steps = 50 if quick else 250
    n = threads()
    rows = []
    for preset in chosen_presets(("tiny",) if quick else ("small",)):
        sizes = decoder_sizes(preset)
        row = {"preset": preset, **sizes, **run_peer(sizes, steps, n, python)}
        ours = measure_ours(preset, steps, sizes["num_codebooks"])
        row["ours"] = ours
        if "steps_per_s" in ours and "steps_per_s" in row:
            row["ours_steps_per_s"] = ours["steps_per_s"]
            row["ours_over_peer"] = ours["steps_per_s"] / row["steps_per_s"]
        rows.append(row)
    return {"threads": n, "steps": steps, "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    notes = [f"- {r['preset']}: {r['ours']['missing']}" for r in result["rows"] if "missing" in r.get("ours", {})]
    notes += [f"- {r['preset']}: {r['error']}" for r in result["rows"] if "error" in r]
    versions = {(r.get("torch"), r.get("transformers")) for r in result["rows"]}
    head = "peer: " + "; ".join(f"torch {t}, transformers {tf}" for t, tf in versions)
    head += f", {result['threads']} threads\n\n"
    return head + markdown_table(result["rows"], COLUMNS) + ("\n\n" + "\n".join(notes) if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny preset, 50 steps")
    parser.add_argument("--venv", help="the peer environment (default benchmarks/peers/.venv)")
    args = parser.parse_args()
    result = run(args.quick, args.venv)
    print(markdown(result))
    print("wrote", write_json("peer", result))


if __name__ == "__main__":
    sys.exit(main())
