"""Text → audio, end to end: MeLoDy vs our MusicGen path at a matched parameter budget, same prompts.

`python -m benchmarks.sampling [--quick]` builds untrained bundles of one preset
(`benchmarks.untrained`; speed does not depend on the weights) and times `generate` for 10 s and
30 s (quick: 10 s) of audio from the same two prompts: per-stage seconds, forward passes, real-time
factor, and the MusicGen / MeLoDy time ratio beside the ratio of their forward-pass counts. MeLoDy
runs twice: with the preset's DPD window (CPU presets train on short windows, so 10 s is a chain of
Algorithm-2 windows, each a full diffusion run) and with the paper's 10-s window (one run).

Budget: MeLoDy's sampling networks (semantic LM + DPD + VAE decoder + MuLan text tower) against a
MusicGen LM of the semantic LM's width, with a text encoder the size of MuLan's text tower, whose
layer count brings its parameters closest to that total; the codec decoder is added on top
(MeLoDy's VAE decoder is counted on its side). The
MeLoDy stages are the preset's, made to fit (k-means clusters and LM vocabulary = the DPD's).
Compilation is timed separately (first call); the table's times are warm medians.
"""
from __future__ import annotations

import importlib
import math
import os
import tempfile
from typing import Any

import jax
from flax import linen as nn

from benchmarks.report import chosen_presets, markdown_table, median_time, quick_cli
from benchmarks.untrained import untrained_bundle
from melody_jax.pipelines.bundle import MELODY_STAGES, MUSICGEN_STAGES, check_fit
from melody_jax.pipelines.generation import Generator
from melody_jax.pipelines.melody import MeLoDy
from melody_jax.pipelines.musicgen import MusicGen
from melody_jax.training.config import apply_overrides
from melody_jax.tasks.registry import get_task

PROMPTS = ["an upbeat pop song with drums and a bright piano melody", "slow ambient strings in a minor key"]
COLUMNS = ["preset", "system", "seconds", "params_m", "forward_passes", "first_call_s", "wall_s", "realtime_x",
           "stage_s", "time_ratio", "passes_ratio"]


def _config(stage: str, preset: str, **fields: Any):
    c = importlib.import_module(f"configs.{stage}").get_config(preset)
    c = apply_overrides(c, {key: str(value) for key, value in fields.items()})
    if "path" in c.data and not c.data.path:
        c.data.path = "unused"  # sampling reads no data; the tasks only check that one is named
    if jax.default_backend() == "cpu" and "dtype" in c.model:
        c.model.dtype = "float32"
    return c


def melody_configs(preset: str, window_s: float | None = None) -> dict:
    """The preset's stages made to fit; `window_s` sets the DPD's window (the paper's is 10 s)."""
    dpd = _config("dpd", preset)
    if window_s:
        dpd.data.latent_length, dpd.data.token_length = int(window_s * 250), int(window_s * 25)
    vocab, lm = dpd.model.vocab_size, _config("semantic_lm", preset)
    ssl = _config("ssl", preset)
    configs = {"vae_gan": _config("vae_gan", preset), "ssl": ssl,
               "kmeans": _config("kmeans", preset, **{"model.num_clusters": vocab,
                                                      "model.embed_dim": ssl.model.embed_dim}),
               "mulan": _config("mulan", preset, **{"data.sample_rate": 24000}),
               "rvq": _config("rvq", preset, **{"model.codebook_size": lm.model.mulan_codebook_size,
                                                 "model.num_quantizers": lm.model.num_mulan_tokens}),
               "semantic_lm": _config("semantic_lm", preset, **{"model.semantic_vocab_size": vocab}),
               "dpd": dpd}
    configs["rvq"].model.embed_dim = configs["mulan"].model.out_dim
    check_fit(configs)
    return configs


def _count(config, part=None) -> int:
    task = get_task(config)
    params = nn.meta.unbox(jax.eval_shape(lambda r: task.init_state(r).params, jax.random.key(0)))
    tree = params if part is None else part(params)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def melody_budget(configs: dict) -> int:
    """Parameters that run at sampling time: LM, DPD, VAE decoder, MuLan text tower."""
    lm, dpd = _count(configs["semantic_lm"]), _count(configs["dpd"])
    vae = _count(configs["vae_gan"], lambda p: p["generator"]["decoder"])
    text = _count(configs["mulan"], lambda p: {k: v for k, v in p.items() if not k.startswith("audio")})
    return lm + dpd + vae + text


def musicgen_configs(preset: str, budget: int, melody: dict) -> dict:
    """The codec of `preset` and a MusicGen LM of the semantic LM's width, with MuLan's text tower as
    its text encoder, sized to `budget`."""
    lm, text = melody["semantic_lm"].model, melody["mulan"].model
    codec = _config("codec", preset)
    q = codec.model.quantizer
    fields = {"model.embed_dim": lm.embed_dim, "model.num_heads": lm.num_heads, "model.mlp_dim": lm.mlp_dim,
              "model.num_codebooks": q.num_quantizers, "model.codebook_size": q.codebook_size,
              "model.text_layers": text.text_layers, "model.text_embed_dim": text.embed_dim,
              "model.text_heads": text.num_heads, "model.text_mlp_dim": text.mlp_dim}
    one, two = (_count(_config("musicgen", preset, **fields, **{"model.num_layers": n})) for n in (1, 2))
    layers = max(1, round((budget - (one - (two - one))) / (two - one)))
    return {"codec": codec, "musicgen": _config("musicgen", preset, **fields, **{"model.num_layers": layers})}


def measure(system: str, pipeline: Generator, seconds: float, params: int, repeats: int) -> dict:
    def run():
        return pipeline.generate(PROMPTS, seconds, seed=0)  # each system's config.sample

    first = run()
    wall = median_time(lambda: run().audio, warmup=0, repeats=repeats)
    last = run()
    return {"system": system, "seconds": seconds, "params_m": params / 1e6,
            "forward_passes": sum(v for k, v in last.forward_passes.items() if k not in ("vae_decode", "codec_decode")),
            "first_call_s": sum(first.seconds.values()), "wall_s": wall,
            "realtime_x": len(PROMPTS) * seconds / wall,
            "stage_s": " / ".join(f"{k} {v:.2f}" for k, v in last.seconds.items())}


def run(quick: bool = False, durations: tuple[float, ...] | None = None) -> dict:
    durations = durations or ((10.0,) if quick else (10.0, 30.0))
    rows = []
    for preset in chosen_presets(("small",)):
        melody_cfg = melody_configs(preset)
        budget = melody_budget(melody_cfg)
        mg_cfg = musicgen_configs(preset, budget, melody_cfg)
        mg_params = _count(mg_cfg["musicgen"]) + _count(mg_cfg["codec"], lambda p: p["generator"]["decoder"])
        with tempfile.TemporaryDirectory() as root:
            melody = MeLoDy(untrained_bundle(root, melody_cfg, MELODY_STAGES, "melody"), progress=False)
            # the same networks with the paper's 10-s DPD window: 10 s is one window, not a chain of them
            wide_cfg = {**melody_cfg, "dpd": melody_configs(preset, window_s=10.0)["dpd"]}
            wide = MeLoDy(untrained_bundle(os.path.join(root, "wide"), wide_cfg, MELODY_STAGES, "melody"),
                          progress=False)
            musicgen = MusicGen(untrained_bundle(root, mg_cfg, MUSICGEN_STAGES, "musicgen"))
            repeats = 1 if quick else 2
            for seconds in durations:
                theirs = measure("musicgen", musicgen, seconds, mg_params, repeats)
                theirs["layers"] = mg_cfg["musicgen"].model.num_layers
                for name, pipeline in (("melody", melody), ("melody, 10-s DPD window", wide)):
                    ours = measure(name, pipeline, seconds, budget, repeats)
                    ours["time_ratio"] = theirs["wall_s"] / ours["wall_s"]
                    ours["passes_ratio"] = theirs["forward_passes"] / ours["forward_passes"]
                    rows.append({"preset": preset, **ours})
                rows.append({"preset": preset, **theirs})
    return {"prompts": PROMPTS, "batch": len(PROMPTS), "rows": rows}


def markdown(result: dict) -> str:
    return (f"batch {result['batch']} (two prompts), each system sampling with its preset's `config.sample` (MeLoDy: "
            "DPD steps, CFG, schedule; MusicGen: top-k, CFG); warm medians; time_ratio = MusicGen wall / this row's wall (> 1: faster than MusicGen), "
            "passes_ratio likewise\n\n"
            + markdown_table(result["rows"], COLUMNS))


def main() -> None:
    quick_cli("sampling", __doc__, "10 s only, one timed repeat", run, markdown)


if __name__ == "__main__":
    main()
