"""`make demo`: MeLoDy from nothing on a laptop-class CPU — data, every stage, a bundle, music.

1. prepares two synthetic captioned datasets at 24 kHz (`data_pipeline.synthetic`, no downloads): one for the
   audio stages, a larger one for the stages that learn from captions (configs/melody.py DATASETS);
2. trains the seven stages at their `tiny` presets for a bounded number of steps (`--recipe`: "demo",
   the default, within 20 minutes on 2 cores; "2h", the ≤ 2-hour recipe; configs/melody.py), in dependency
   order (VAE-GAN, SSL → k-means, MuLan → RVQ), then caches their latents and tokens over the data
   (`launch.tokenize`) and trains the semantic LM and the DPD on them;
3. assembles a bundle and generates three prompts (one 30 s long, by continuation windows);
4. evaluates the bundle on synthetic prompts against the held-out clips (`launch.evaluate`: FAD on
   MuLan and musicnn embeddings, MuLan cycle consistency, tempo / key / drums / instrument accuracy),
   and each stage on its own on STAGE_CLIPS further synthetic clips no stage trained on
   (`melody_jax.evaluation.stage_quality`: VAE-GAN reconstruction, token probes and the beat they mark,
   MuLan retrieval, LM loss against the token stream's entropy, DPD with true vs shuffled tokens, tempo
   down the chain);
5. writes WAVs, spectrogram PNGs and WORKDIR/report.md (losses, time per stage, real-time factor,
   the evaluation, the stage table) and WORKDIR/eval.json.

Every stage resumes when the demo is run again; finished stages are skipped. WORKDIR/recipe.json keeps
the recipe and steps scale a workdir was started with: another one there is refused, not mixed in. Tiny models on a few
minutes of CPU make recognisably structured noise, not music — the demo proves the whole path.
"""
from __future__ import annotations

import json
import os
import time

from absl import flags

from configs.melody import RECIPES, Recipe
from launch.common import quiet_library_logs, run_app, run_user_errors
from melody_jax.training.errors import ConfigError, WorkdirError
from melody_jax.training.metrics import write_json_atomic

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes its runs, bundle and audio.")
_RECIPE = flags.DEFINE_enum("recipe", "demo", list(RECIPES),
                            "The budget (configs/melody.py): demo (≤ 20 min on 2 cores) or 2h (≤ 2 h).")
_STEPS = flags.DEFINE_float("steps_scale", 1.0, "Multiplies the recipe's step counts (0.1 for a smoke run).")

PROMPTS = [("solo piano, slow, calm, in C major", 10.0), ("drums and bass, fast, energetic", 10.0),
           ("strings and flute, happy, in G major", 30.0)]
STAGE_CLIPS = 64  # held-out clips of the stage table (another seed than the training data): 16 per probe fold
HELD_OUT_SEED, CAPTIONS_SEED = 1, 2  # the stage table's clips and the caption stages' dataset (the audio one: 0)


def workdir_recipe(root: str, name: str, steps_scale: float) -> Recipe:
    """The recipe `name` with its steps scaled, recorded in root/recipe.json on the first run; a workdir
    started with another recipe or scale raises WorkdirError (its finished stages would be skipped as trained)."""
    if steps_scale <= 0:
        raise ConfigError(f"--steps_scale={steps_scale:g} must be positive")
    wanted = {"recipe": name, "steps_scale": steps_scale}
    path = os.path.join(root, "recipe.json")
    if os.path.exists(path):
        with open(path) as f:
            started = json.load(f)
        if started != wanted:
            raise WorkdirError(f"{root} was started with --recipe={started['recipe']} --steps_scale="
                            f"{started['steps_scale']:g}; resume with those or use another --workdir")
    else:
        os.makedirs(root, exist_ok=True)
        write_json_atomic(path, wanted)
    recipe = RECIPES[name]
    return recipe._replace(steps_scale=recipe.steps_scale * steps_scale)


def train_stage(name: str, config, workdir: str, log: dict) -> None:
    from melody_jax.tasks.registry import get_task
    from melody_jax.training.loop import train

    final = os.path.join(workdir, "final_metrics.json")
    if os.path.exists(final):
        with open(final) as f:
            log[name] = {**json.load(f), "seconds": 0.0, "note": "already trained"}
        print(f"[demo] {name}: already trained", flush=True)
        return
    print(f"[demo] training {name} ({config.train.num_steps} steps)", flush=True)
    start = time.perf_counter()
    summary = train(get_task(config), workdir)
    if summary["status"] != "done":  # SIGTERM/Ctrl-C: the stage saved its step; later stages need it whole
        raise SystemExit(f"[demo] {name} {summary['status']} at step {summary['step']} (saved in {workdir}); "
                         "run the demo again to resume")
    log[name] = {**summary, "seconds": time.perf_counter() - start}


def tokenize(root: str, datasets: dict[str, str], stage: str) -> None:
    """`stage`'s cache of records (configs/melody.py CACHES) under `root`, unless it is finished."""
    import jax

    from configs.melody import CACHES, TOKENIZE_STAGES
    from data_pipeline.tokenized import CropSpec, FrozenStages, tokenize_dataset
    from melody_jax.tasks.sources import TRAIN, read_manifest
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    cache = CACHES[stage]
    out = os.path.join(root, cache.folder)
    if TRAIN in read_manifest(out).get("splits", {}):
        return
    print(f"[demo] caching {', '.join(cache.fields)} of {cache.seconds:g}-s crops for {stage}", flush=True)
    dirs = {s: os.path.join(root, s) for s in TOKENIZE_STAGES}
    stages = FrozenStages(dirs, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    sliding = cache.hop_seconds < cache.seconds
    spec = CropSpec(cache.seconds, "sliding" if sliding else "fixed", hop_seconds=cache.hop_seconds if sliding else 0.0)
    tokenize_dataset(datasets[cache.dataset], [TRAIN], out, stages, spec, 16, fields=cache.fields)


def write_report(path: str, recipe: str, log: dict, outputs: list[dict], evaluation: str, stages: str) -> None:
    lines = ["# melody-jax demo", "", f"## Stages (tiny presets; {recipe})", "",
             "| stage | steps | final loss | seconds |", "|---|---|---|---|"]
    for name, s in log.items():
        loss = s.get("loss")
        lines.append(f"| {name} | {s.get('step', '')} | {loss:.4f} | {s.get('seconds', 0):.0f} |"
                     if isinstance(loss, float) else f"| {name} | {s.get('step', '')} | | {s.get('seconds', 0):.0f} |")
    lines += ["", "## Generated", "", "| prompt | seconds of audio | wall s (mulan / LM / DPD / decode) | "
              "real-time factor | files |", "|---|---|---|---|---|"]
    for o in outputs:
        t = o["seconds"]
        lines.append(f"| {o['prompt']} | {o['duration']:.1f} | {t['mulan']:.2f} / {t['semantic_lm']:.2f} / "
                     f"{t['dpd']:.2f} / {t['vae_decode']:.2f} | {o['rtf']:.2f} | {os.path.basename(o['wav'])}, "
                     f"{os.path.basename(o['png'])} |")
    lines += ["", "Times include compilation on first use of each shape. Tiny models trained for minutes: "
              "expect structured noise, not music.", "", "## Evaluation (`launch.evaluate`)", "", evaluation,
              "## Stage by stage (`melody_jax.evaluation.stage_quality`)", "", stages]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()

    def run() -> None:
        import jax
        import numpy as np

        from configs.melody import STAGES, demo_configs
        from data_pipeline.builder import PrepareSettings, prepare
        from melody_jax.evaluation.plots import spectrogram_png
        from melody_jax.pipelines.bundle import assemble
        from melody_jax.pipelines.melody import MeLoDy
        from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

        root = _WORKDIR.value
        recipe = workdir_recipe(root, _RECIPE.value, _STEPS.value)
        data, captions = os.path.join(root, "data"), os.path.join(root, "captions")
        print(f"[demo] preparing the synthetic datasets ({recipe.clips} clips; {recipe.caption_clips} for the "
              "caption stages)", flush=True)
        prepare(PrepareSettings(source="synthetic", num_clips=recipe.clips, clip_seconds=4.0, val_fraction=0.15),
                data, progress=False)
        prepare(PrepareSettings(source="synthetic", num_clips=recipe.caption_clips, clip_seconds=4.0,
                                val_fraction=0.15, seed=CAPTIONS_SEED), captions, progress=False)
        datasets = {"audio": data, "captions": captions}
        configs = demo_configs(datasets, root, recipe.steps_scale, recipe.changes)
        log: dict = {}
        for name in STAGES:
            if configs[name].data.source == "cached":
                tokenize(root, datasets, name)
            train_stage(name, configs[name], os.path.join(root, name), log)
        bundle = os.path.join(root, "bundle")
        if not os.path.exists(os.path.join(bundle, "bundle.json")):
            assemble(bundle, {s: os.path.join(root, s) for s in STAGES},
                     make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
        melody = MeLoDy(bundle)
        outputs = []
        for i, (prompt, seconds) in enumerate(PROMPTS):
            print(f"[demo] generating {seconds:g} s: {prompt}", flush=True)
            result = melody.generate([prompt], seconds, seed=i)
            wav, png = os.path.join(root, f"demo_{i}.wav"), os.path.join(root, f"demo_{i}.png")
            import soundfile as sf

            sf.write(wav, np.clip(result.audio[0], -1, 1), result.sample_rate, subtype="PCM_16")
            spectrogram_png(result.audio[0], result.sample_rate, png, prompt)
            outputs.append({"prompt": prompt, "duration": seconds, "seconds": result.seconds,
                            "rtf": result.real_time_factor, "wav": wav, "png": png})
        print(f"[demo] evaluating on {recipe.eval_prompts} synthetic prompts against the held-out clips", flush=True)
        from data_pipeline.builder import read_clips
        from melody_jax.evaluation.generation import evaluate, markdown, read_prompts

        report = evaluate(melody, read_prompts(f"synthetic:{recipe.eval_prompts}"),
                          read_clips(data, "validation", melody.sample_rate), duration_s=10.0)
        print(f"[demo] measuring each stage on {STAGE_CLIPS} held-out clips", flush=True)
        from melody_jax.evaluation import stage_quality

        heldout = os.path.join(root, "heldout")
        prepare(PrepareSettings(source="synthetic", num_clips=STAGE_CLIPS, clip_seconds=4.0, seed=HELD_OUT_SEED),
                heldout, progress=False)
        stages = stage_quality.stage_quality(melody, read_clips(heldout, "train", melody.sample_rate))
        write_json_atomic(os.path.join(root, "eval.json"), {**report, "stage_quality": stages}, sort_keys=False)
        write_report(os.path.join(root, "report.md"), f"recipe {_RECIPE.value}, steps × {recipe.steps_scale:g}", log,
                     outputs, markdown(report), stage_quality.markdown(stages))
        print(open(os.path.join(root, "report.md")).read())

    run_user_errors(run)


if __name__ == "__main__":
    run_app(main)
