"""Evaluate a bundle's text → music against reference audio (DESIGN §10, issue 9), MeLoDy or MusicGen.

Reports, with the reference's own score beside every generated one so numbers can be read:
- FAD on MuLan audio embeddings (ours) and on musicnn embeddings (not ours), generated vs
  reference; "reference halves" is the FAD between two halves of the reference — the floor at that
  sample count (FAD is biased upward for few samples, so compare only equal counts);
- MuLan cycle consistency (prompt text vs generated audio), beside the reference captions vs their
  audio (the MuLan measures need the pipeline's `mulan`: MeLoDy's own; a MusicGen bundle has none,
  so they are n/a);
- on synthetic prompts, attribute accuracy (tempo, key/mode, drums, lead instrument) of generated
  audio, beside the same checks on reference clips against their own attributes.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from melody_jax.evaluation import attributes
from melody_jax.evaluation.fad import frechet_audio_distance
from melody_jax.evaluation.mcc import mulan_cycle_consistency
from melody_jax.evaluation.musicnn import musicnn_features
from melody_jax.pipelines.generation import Generator
from melody_jax.training.errors import EvaluationError

Prompt = tuple[str, dict[str, Any] | None]  # (text, synthetic attributes or None)


def read_prompts(spec: str) -> list[Prompt]:
    """`synthetic:N[:SEED]` (N drawn synthetic captions with their attributes), a .jsonl file of
    {"text": ..., "attributes": {...}} lines (attributes optional), or a text file, one per line."""
    if spec.startswith("synthetic:"):
        from data_pipeline.synthetic import synthetic_prompts

        parts = spec.split(":")
        try:
            n, seed = int(parts[1]), int(parts[2]) if len(parts) > 2 else 1234
        except (IndexError, ValueError):
            raise EvaluationError(f"--prompts={spec!r}: expected synthetic:N or synthetic:N:SEED") from None
        return [(text, a) for text, a in synthetic_prompts(n, seed)]
    try:
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise EvaluationError(f"--prompts: cannot read {spec}: {e.strerror}") from None
    if not spec.endswith(".jsonl"):
        return [(line, None) for line in lines]
    prompts = []
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
            prompts.append((str(row["text"]), row.get("attributes")))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvaluationError(f"{spec}:{i}: expected a JSON object with a \"text\" field") from None
    return prompts


def _generate(pipeline: Generator, texts: list[str], duration_s: float, seed: int, batch_size: int,
              sampling: dict[str, Any]) -> np.ndarray:
    """[P, T] audio; the last batch is padded with its own prompts so every batch has one shape."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        out.append(pipeline.generate(padded, duration_s, seed=seed + start, **sampling).audio[: len(chunk)])
    return np.concatenate(out)


def _mulan_audio(mulan, clips: Sequence[np.ndarray]) -> np.ndarray:
    """Per-clip MuLan embeddings, one call per distinct clip length."""
    out = np.zeros((len(clips), 0), np.float32)
    for length in sorted({len(c) for c in clips}):
        rows = [i for i, c in enumerate(clips) if len(c) == length]
        emb = np.asarray(mulan.audio_embeddings(np.stack([clips[i] for i in rows])))
        if out.shape[1] == 0:
            out = np.zeros((len(clips), emb.shape[1]), np.float32)
        out[rows] = emb
    return out


def _halves_fad(embeddings: np.ndarray, owner: np.ndarray, count: int) -> float | None:
    """FAD between the rows of the first and the second half of `count` clips (None if too few)."""
    first = owner < count // 2
    if first.sum() < 2 or (~first).sum() < 2:
        return None
    return frechet_audio_distance(embeddings[first], embeddings[~first])


def evaluate(pipeline: Generator, prompts: Sequence[Prompt], reference: Sequence[Mapping[str, Any]],
             duration_s: float | None = None, seed: int = 0, batch_size: int = 4, **sampling: Any) -> dict[str, Any]:
    """Generates one clip per prompt and scores it against `reference` clips (dicts of `audio` at the
    pipeline's rate, `caption`, `attributes`, as `data_pipeline.builder.read_clips` returns).
    Prompt i uses seed + i; `duration_s` and `sampling` left out (None) are the bundle's."""
    if len(prompts) < 2 or len(reference) < 4:
        raise EvaluationError(f"evaluation needs ≥ 2 prompts and ≥ 4 reference clips, got {len(prompts)} and "
                              f"{len(reference)}")
    sr = pipeline.sample_rate
    settings = pipeline.settings(duration_s, **sampling)
    duration_s = settings.pop("duration")
    texts = [t for t, _ in prompts]
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    generated = _generate(pipeline, texts, duration_s, seed, batch_size, settings)
    seconds["generate"] = time.perf_counter() - t0
    ref_audio = [np.asarray(r["audio"], np.float32) for r in reference]

    fad_mulan, mcc = {"generated": None, "reference_halves": None}, {"generated": None, "reference": None}
    if pipeline.mulan is not None:
        t0 = time.perf_counter()
        mulan = pipeline.mulan
        gen_mulan, ref_mulan = _mulan_audio(mulan, list(generated)), _mulan_audio(mulan, ref_audio)
        fad_mulan = {"generated": frechet_audio_distance(gen_mulan, ref_mulan),
                     "reference_halves": _halves_fad(ref_mulan, np.arange(len(reference)), len(reference))}
        mcc = {"generated": float(mulan_cycle_consistency(mulan.text_embeddings(texts), gen_mulan)),
               "reference": float(mulan_cycle_consistency(
                   mulan.text_embeddings([r["caption"] for r in reference]), ref_mulan))}
        seconds["mulan"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    feats = musicnn_features(list(generated) + ref_audio, sr)
    seconds["musicnn"] = time.perf_counter() - t0
    is_gen = feats.clip_of_patch < len(generated)
    ref_patches, ref_owner = feats.embeddings[~is_gen], feats.clip_of_patch[~is_gen] - len(generated)
    clip_emb = feats.clip_embeddings()
    gen_clip_emb, ref_clip_emb = clip_emb[: len(generated)], clip_emb[len(generated):]

    report: dict[str, Any] = {
        "system": pipeline.name, "prompts": len(prompts), "reference_clips": len(reference),
        "duration_s": duration_s, "sampling": settings, "seed": seed,
        "fad_mulan": fad_mulan,
        "fad_musicnn": {"generated": frechet_audio_distance(feats.embeddings[is_gen], ref_patches),
                        "reference_halves": _halves_fad(ref_patches, ref_owner, len(reference)),
                        "patches_generated": int(is_gen.sum()), "patches_reference": int((~is_gen).sum())},
        "mcc": mcc,
        "attributes": None,
    }
    asked = [(i, a) for i, (_, a) in enumerate(prompts) if a]
    ref_rows = [i for i, r in enumerate(reference) if r.get("attributes", {}).get("lead")]
    leads = [reference[i]["attributes"]["lead"] for i in ref_rows]
    if asked and len(set(leads)) >= 2:
        t0 = time.perf_counter()
        rows = [i for i, _ in asked]
        gen_instruments = attributes.nearest_centroid(ref_clip_emb[ref_rows], leads, gen_clip_emb[rows])
        ref_instruments = attributes.leave_one_out_predictions(ref_clip_emb[ref_rows], leads)
        gen_hits = attributes.hits([generated[i] for i in rows], sr, [a for _, a in asked], gen_instruments)
        report["attributes"] = {
            "generated": attributes.shares(gen_hits),
            "generated_named": attributes.named_accuracy(gen_hits, [texts[i] for i in rows], [a for _, a in asked]),
            "reference": attributes.accuracy([ref_audio[i] for i in ref_rows], sr,
                                             [reference[i]["attributes"] for i in ref_rows], ref_instruments),
            "checked_prompts": len(rows), "checked_reference": len(ref_rows),
            "instrument_classes": sorted(set(leads)),
        }
        seconds["attributes"] = time.perf_counter() - t0
    report["seconds"] = seconds
    return report


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a small Markdown table: each measure, generated beside the reference."""
    def f(x) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    sampling = ", ".join(f"{k} {v}" for k, v in report["sampling"].items())
    lines = [f"{report['system']}: {report['prompts']} prompts × {report['duration_s']:g} s ({sampling}) vs "
             f"{report['reference_clips']} reference clips", "",
             "| measure | generated | reference |", "|---|---|---|",
             f"| FAD, MuLan embeddings (lower is better) | {f(report['fad_mulan']['generated'])} | "
             f"{f(report['fad_mulan']['reference_halves'])} (half vs half) |",
             f"| FAD, musicnn embeddings (lower is better) | {f(report['fad_musicnn']['generated'])} | "
             f"{f(report['fad_musicnn']['reference_halves'])} (half vs half) |",
             f"| MuLan cycle consistency (higher is better) | {f(report['mcc']['generated'])} | "
             f"{f(report['mcc']['reference'])} |"]
    attrs = report.get("attributes")
    if attrs:
        for check in attributes.CHECKS:
            lines.append(f"| {check} accuracy | {f(attrs['generated'][check])} | {f(attrs['reference'][check])} |")
        for check, n in attrs["generated_named"].items():
            lines.append(f"| {check} accuracy, the {n['prompts']} prompts naming it | {f(n['accuracy'])} | |")
        lines.append("")
        classes = attrs["instrument_classes"]
        lines.append(f"Instrument: nearest-centroid on musicnn embeddings over {', '.join(classes)} "
                     f"(chance {1 / len(classes):.2f}); reference column: leave-one-out.")
    return "\n".join(lines) + "\n"
