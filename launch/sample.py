"""`python -m launch.sample --bundle=DIR --prompt="..." [--prompt=...] [--duration=30 --steps=N --cfg=S]
--seed=0 --out=out.wav`, or from audio: `--continue=FILE`, `--inpaint=FILE --start=S --end=E`,
`--audio_prompt=FILE`. A MusicGen bundle — one trained here or converted from a public checkpoint
(`launch.convert`) — is sampled with audiocraft's modes: `--prompt` (optionally `--melody=FILE` to
follow its chromagram), `--continue=FILE` (its audio encoded and continued by `--duration` seconds;
with or without `--prompt`), `--unconditional`. The bundle's stages say which system it holds;
every sampling flag left out (duration, steps, schedule, CFG, temperature, top-k, top-p; MeLoDy's
`--lm_cfg`; MusicGen's `--cfg_beta`, `--two_step_cfg`) takes the bundle's `sample` config.

Writes one WAV (16-bit, the bundle's rate) and one spectrogram PNG per output (`out.wav`, or
`out_0.wav`, `out_1.wav`, … for a batch), and prints the time per stage and the real-time factor.
Prompt i uses seed `--seed + i`, so the same command gives the same audio.
"""
from __future__ import annotations

import os

import numpy as np
from absl import flags

from launch.common import quiet_library_logs, run_app, run_user_errors
from launch.outputs import write_outputs
from melody_jax.diffusion.angles import SCHEDULES

_BUNDLE = flags.DEFINE_string("bundle", None, "Bundle directory (python -m launch.bundle).")
_MELODY = flags.DEFINE_string("melody", None, "musicgen: audio whose chromagram the music follows.")
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Text prompt; repeat for a batch.")
_DURATION = flags.DEFINE_float("duration", None, "Seconds to generate (continuation: seconds to add); default: "
                                                 "the bundle's.")
_STEPS = flags.DEFINE_integer("steps", None, "MeLoDy: diffusion sampling steps (default: the bundle's).")
_SCHEDULE = flags.DEFINE_enum("schedule", None, list(SCHEDULES), "MeLoDy: DPD angle schedule (default: the bundle's).")
_CANDIDATES = flags.DEFINE_integer("inpaint_candidates", None, "MeLoDy --inpaint: spans the semantic LM draws, one "
                                                               "kept by the right context (1 = left context only; "
                                                               "default: the bundle's).")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: the bundle's).")
_LM_CFG = flags.DEFINE_float("lm_cfg", None, "MeLoDy: the semantic LM's guidance scale against its null prefix (1 = "
                                             "off; needs an LM trained with model.cfg_dropout; default: the bundle's).")
_CFG_BETA = flags.DEFINE_float("cfg_beta", None, "musicgen (melody models): double CFG, text pushed by beta against "
                                                 "the melody (audiocraft's cfg_coef_beta; default: the bundle's).")
_TWO_STEP_CFG = flags.DEFINE_bool("two_step_cfg", None, "musicgen: run the CFG branches as separate forward passes "
                                                        "with their own KV caches (default: the bundle's).")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt i uses seed + i.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Sampling temperature (default: the bundle's).")
_TOP_K = flags.DEFINE_integer("top_k", None, "Top-k of the semantic LM or of musicgen, 0 = off (default: the "
                                             "bundle's).")
_TOP_P = flags.DEFINE_float("top_p", None, "Nucleus mass: semantic LM (1 = off); musicgen (0 = off; > 0 replaces "
                                           "top-k, as audiocraft); default: the bundle's.")
_UNCONDITIONAL = flags.DEFINE_bool("unconditional", False, "musicgen: sample the null condition (no text, no melody).")
_CONTINUE = flags.DEFINE_string("continue", None, "Audio file to continue by --duration seconds.")
_INPAINT = flags.DEFINE_string("inpaint", None, "Audio file whose [--start, --end) span is regenerated.")
_START = flags.DEFINE_float("start", None, "Inpainting span start (s).")
_END = flags.DEFINE_float("end", None, "Inpainting span end (s).")
_AUDIO_PROMPT = flags.DEFINE_string("audio_prompt", None, "Audio file used as the prompt (MuLan audio tower).")
_OUT = flags.DEFINE_string("out", "out.wav", "Output WAV path (a batch adds _<i>).")
_NO_PROGRESS = flags.DEFINE_bool("no_progress", False, "Hide the progress bar.")
flags.mark_flags_as_required(["bundle"])


def read_audio(path: str, sample_rate: int) -> np.ndarray:
    from data_pipeline.audio_io import BadAudio, decode
    from melody_jax.pipelines.generation import AudioInputError

    try:
        return decode(path, sample_rate)
    except BadAudio as e:
        raise AudioInputError(f"{path}: {e}") from None


def check_arguments() -> str:
    """Every flag given in range and the output path writable, before a bundle is loaded; the absolute --out."""
    from melody_jax.pipelines.validation import (MAX_PROMPT_CHARS, MAX_SECONDS, check_duration, check_min_duration,
                                                  check_output_path, check_prompt, check_sampling)

    for prompt in _PROMPTS.value:
        check_prompt(prompt, MAX_PROMPT_CHARS)
    if _DURATION.value is not None:
        check_min_duration(check_duration(_DURATION.value, MAX_SECONDS))
    given = dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, cfg=_CFG.value, steps=_STEPS.value,
                 cfg_beta=_CFG_BETA.value, inpaint_candidates=_CANDIDATES.value, lm_cfg=_LM_CFG.value,
                 top_p=None if _TOP_P.value == 0 else _TOP_P.value)  # top_p 0: MusicGen's "top-k instead"
    check_sampling(seed=_SEED.value, count=max(len(_PROMPTS.value), 1), **given)
    return check_output_path(_OUT.value)


def sampling() -> dict:
    """The sampling flags; None (not given) takes the bundle's."""
    return dict(steps=_STEPS.value, schedule=_SCHEDULE.value, cfg=_CFG.value, temperature=_TEMPERATURE.value,
                top_k=_TOP_K.value, top_p=_TOP_P.value, cfg_beta=_CFG_BETA.value, two_step_cfg=_TWO_STEP_CFG.value,
                lm_cfg=_LM_CFG.value, seed=_SEED.value)


def run_musicgen(pipeline, prompts: list[str] | None) -> tuple:
    """(result, titles) of a MusicGen bundle in the mode the flags ask for."""
    from melody_jax.pipelines.generation import AudioInputError

    if _INPAINT.value or _AUDIO_PROMPT.value:
        raise AudioInputError("a MusicGen bundle takes --prompt, --melody, --continue or --unconditional, not "
                              "--inpaint or --audio_prompt")
    common = sampling()
    if _UNCONDITIONAL.value:
        if prompts or _MELODY.value or _CONTINUE.value:
            raise AudioInputError("--unconditional takes no --prompt, --melody or --continue")
        return pipeline.generate_unconditional(1, _DURATION.value, **common), ["unconditional"]
    if _CONTINUE.value:
        if _MELODY.value:
            raise AudioInputError("give --melody or --continue, not both")
        audio = read_audio(_CONTINUE.value, pipeline.sample_rate)  # mono (a stereo model gets it on both sides)
        return (pipeline.generate_continuation(audio, _DURATION.value, prompts, **common),
                [f"continuation of {_CONTINUE.value}"])
    if not prompts:
        raise AudioInputError("give --prompt, --continue or --unconditional")
    melody = read_audio(_MELODY.value, pipeline.sample_rate) if _MELODY.value else None
    return pipeline.generate(prompts, _DURATION.value, melody=melody, **common), list(prompts)


def run(pipeline) -> tuple:
    """(result, titles) for the mode the flags ask for."""
    from melody_jax.pipelines.generation import AudioInputError

    modes = [m for m in (_CONTINUE.value, _INPAINT.value, _AUDIO_PROMPT.value) if m]
    if len(modes) > 1:
        raise AudioInputError("give at most one of --continue, --inpaint, --audio_prompt")
    prompts = _PROMPTS.value or None
    if pipeline.name == "musicgen":
        return run_musicgen(pipeline, prompts)
    if _MELODY.value or _UNCONDITIONAL.value:
        raise AudioInputError("--melody and --unconditional need a MusicGen bundle")
    common = sampling()
    if _CONTINUE.value:
        audio = read_audio(_CONTINUE.value, pipeline.sample_rate)
        return (pipeline.generate_continuation(audio, _DURATION.value, prompts, **common),
                [f"continuation of {_CONTINUE.value}"])
    if _INPAINT.value:
        if _START.value is None or _END.value is None:
            raise AudioInputError("--inpaint needs --start and --end (seconds)")
        audio = read_audio(_INPAINT.value, pipeline.sample_rate)
        return (pipeline.inpaint(audio, _START.value, _END.value, prompts, inpaint_candidates=_CANDIDATES.value,
                                 **common),
                [f"{_INPAINT.value} inpainted {_START.value:g}-{_END.value:g} s"])
    if _AUDIO_PROMPT.value:
        audio = read_audio(_AUDIO_PROMPT.value, pipeline.sample_rate)
        return (pipeline.generate_from_audio_prompt(audio, _DURATION.value, **common),
                [f"prompted by {_AUDIO_PROMPT.value}"])
    if not prompts:
        raise AudioInputError("give --prompt (text), --continue, --inpaint or --audio_prompt")
    return pipeline.generate(prompts, _DURATION.value, **common), list(prompts)


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    def go() -> None:
        out = check_arguments()
        from melody_jax.pipelines.load import load_pipeline

        pipeline = load_pipeline(_BUNDLE.value, progress=not _NO_PROGRESS.value)
        result, titles = run(pipeline)
        paths = write_outputs(result, out, titles * (len(result.audio) // len(titles)))
        seconds = len(result.audio[0]) / result.sample_rate
        print("stage        seconds  forward passes")
        for stage, t in result.seconds.items():
            print(f"{stage:<12} {t:7.3f}  {result.forward_passes.get(stage, '')}")
        print(f"total        {sum(result.seconds.values()):7.3f}  for {len(paths)} × {seconds:.2f} s of audio: "
              f"real-time factor {result.real_time_factor:.2f} (first call includes compilation)")
        for p in paths:
            print("wrote", p, "and", os.path.splitext(p)[0] + ".png")

    run_user_errors(go)


if __name__ == "__main__":
    run_app(main)
