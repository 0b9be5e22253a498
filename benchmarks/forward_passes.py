"""Network forward passes needed to sample S seconds of music: MusicLM, MeLoDy and MusicGen.

The MeLoDy paper's headline is a count, not a time: it reports 95.7% (10 s) and 99.6% (30 s) fewer
forward passes than MusicLM. These pure functions make that count explicit so the sampling
benchmarks can put a measured seconds-per-pass next to it. A pass is one network call over every
row of the batch; classifier-free guidance with both branches in one batch is one pass
(`cfg_batched=False` counts two).

- MusicLM: 25 semantic tokens/s, then SoundStream at 50 Hz with 4 coarse and 8 fine RVQ levels,
  each token its own autoregressive step: 25 + 4·50 + 8·50 = 625 passes per second.
- MeLoDy: the semantic LM (25 tokens/s, one pass each) and `dpd_steps` DPD passes per window.
- MusicGen: 4 codebooks at 50 Hz under the delay pattern: T frames take T + 3 steps.

With windows (`window_s`, keeping `keep_s` seconds as the next window's prompt) a later window's
prompt goes in one prefill pass whose output is its first new token, so an LM still costs one pass
per new token (MusicGen: per new step, and each window drains its own K − 1 delay steps); the DPD
runs `dpd_steps` passes per window.

Reproducing the paper: at 10 s with 20 DPD steps, 1 − (250 + 20) / 6250 = 95.7%, the paper's figure.
Counting linearly in time, 30 s gives the same 95.7%; the paper's 99.6% at 30 s needs a MusicLM
count that grows faster than the audio (its derivation is not given), so `reduction` reports both.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

from benchmarks.report import markdown_table, write_json

SEMANTIC_RATE = 25  # w2v-BERT / our semantic tokens per second
ACOUSTIC_RATE = 50  # SoundStream (MusicLM) and EnCodec (MusicGen) frames per second
COARSE_LEVELS, FINE_LEVELS = 4, 8  # MusicLM's RVQ split (12 levels)
PAPER_REDUCTION = {10: 0.957, 30: 0.996}  # MeLoDy abstract: fewer forward passes than MusicLM
PAPER_DPD_STEPS = 20  # the step count with which the 10 s figure is reproduced


def num_windows(seconds: float, window_s: float | None, keep_s: float = 0.0) -> int:
    """Windows needed to cover `seconds` when each later window adds window_s − keep_s new seconds."""
    if window_s is None or seconds <= window_s:
        return 1
    if not 0 <= keep_s < window_s:
        raise ValueError(f"keep_s={keep_s} must lie in [0, window_s={window_s})")
    return 1 + math.ceil((seconds - window_s) / (window_s - keep_s) - 1e-9)


def _tokens(seconds: float, rate: float) -> int:
    return math.ceil(seconds * rate - 1e-9)


def musiclm_passes(seconds: float) -> dict[str, int]:
    """Semantic, coarse and fine acoustic LM passes, one per token (MusicLM flattens the RVQ levels)."""
    semantic = _tokens(seconds, SEMANTIC_RATE)
    coarse = COARSE_LEVELS * _tokens(seconds, ACOUSTIC_RATE)
    fine = FINE_LEVELS * _tokens(seconds, ACOUSTIC_RATE)
    return {"semantic": semantic, "coarse": coarse, "fine": fine, "total": semantic + coarse + fine}


def melody_passes(seconds: float, dpd_steps: int, lm_tokens_per_s: float = SEMANTIC_RATE, *,
                  window_s: float | None = None, keep_s: float = 0.0, cfg_batched: bool = True) -> dict[str, int]:
    """Semantic LM passes (one per token; a window's prefill yields its first token) and DPD passes."""
    windows = num_windows(seconds, window_s, keep_s)
    lm = _tokens(seconds, lm_tokens_per_s)
    dpd = windows * dpd_steps * (1 if cfg_batched else 2)
    return {"lm": lm, "dpd": dpd, "windows": windows, "total": lm + dpd}


def musicgen_passes(seconds: float, *, frame_rate: float = ACOUSTIC_RATE, num_codebooks: int = 4,
                    window_s: float | None = None, keep_s: float = 0.0, cfg_batched: bool = True) -> dict[str, int]:
    """Delay-pattern decoder steps: T frames take T + K − 1 steps, and each window N new frames + K − 1."""
    windows = num_windows(seconds, window_s, keep_s)
    steps = _tokens(seconds, frame_rate) + windows * (num_codebooks - 1)
    return {"steps": steps, "windows": windows, "total": steps * (1 if cfg_batched else 2)}


def reduction(seconds: float, dpd_steps: int = PAPER_DPD_STEPS, **melody_kwargs: Any) -> dict[str, float]:
    """MeLoDy's fraction of MusicLM passes saved, with the paper's figure where it gives one."""
    ours = melody_passes(seconds, dpd_steps, **melody_kwargs)["total"]
    musiclm = musiclm_passes(seconds)["total"]
    row = {"seconds": seconds, "dpd_steps": dpd_steps, "musiclm": musiclm, "melody": ours,
           "musicgen": musicgen_passes(seconds)["total"], "reduction": 1 - ours / musiclm}
    if seconds in PAPER_REDUCTION:
        row["paper_reduction"] = PAPER_REDUCTION[seconds]
    return row


def run(quick: bool = False) -> dict[str, Any]:
    """The count table at 10 s and 30 s (no timing: cheap in both modes)."""
    rows = [reduction(s, steps) for s in (10, 30) for steps in (10, PAPER_DPD_STEPS, 50)]
    return {"rows": rows}


def markdown(result: dict[str, Any]) -> str:
    return markdown_table(result["rows"], ["seconds", "dpd_steps", "musiclm", "melody", "musicgen", "reduction",
                                           "paper_reduction"])


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    result = run()
    print(markdown(result))
    print("wrote", write_json("forward_passes", result))


if __name__ == "__main__":
    main()
