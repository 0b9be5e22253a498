"""`python -m launch.app --bundle=DIR [--bundle=DIR ...]`: a web page to listen to any bundle (Gradio).

Each bundle (MeLoDy or MusicGen, told apart by the stages it holds) is loaded once at start-up and
shared by every request; its jitted programs compile on the first request of each shape. Requests
queue one at a time, and MeLoDy text prompts that arrive together with the same settings run as one
batch (row i keeps its own seed, so a batch equals its requests run one by one). What the user
typed or uploaded is checked by the plain functions below before any compute, and every problem
comes back as one `error: ...` line in the page, never a traceback.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
import tempfile
import threading
import traceback
import uuid
from concurrent.futures import Future
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import flags

from melody_jax.diffusion.angles import SCHEDULES
from melody_jax.pipelines.validation import MAX_PROMPT_CHARS, MAX_SECONDS, check_duration, check_prompt
from melody_jax.training.errors import UserError

_BUNDLES = flags.DEFINE_multi_string("bundle", [], "Bundle directory (python -m launch.bundle); repeat for more.")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (0.0.0.0 to be reachable from other hosts).")
_PORT = flags.DEFINE_integer("port", 7860, "Port to serve on.")
_MAX_DURATION = flags.DEFINE_float("max_duration", 30.0, "Longest audio (s) a request may ask for.")
_MAX_BATCH = flags.DEFINE_integer("max_batch", 4, "Requests that arrive together are batched up to this many.")
_MAX_UPLOAD_MB = flags.DEFINE_integer("max_upload_mb", 50, "Largest upload accepted (MiB).")

KINDS = {"melody": "MeLoDy", "musicgen": "MusicGen"}
MODES = {"melody": ("text", "continue the clip", "inpaint a span of the clip", "the clip as prompt"),
         "musicgen": ("text", "text + the clip as melody")}
TEXT, CONTINUE, INPAINT, AUDIO_PROMPT = MODES["melody"]
MELODY = MODES["musicgen"][1]
MELODY_ONLY = ("steps", "schedule", "top_p", "lm_cfg", "inpaint_candidates")  # the page's controls only MeLoDy reads
MAX_CANDIDATES = 16  # inpainting spans the semantic LM may draw per request (each costs a span of LM steps)


class AppInputError(UserError, ValueError):
    """A request from the page that cannot be run as asked; its message is shown there."""


# --- checks on a request: plain functions, no JAX -----------------------------------------------------
def _message(e: UserError) -> str:
    """The pipelines' messages name CLI flags (`--duration=...`); the page has fields, not flags."""
    return str(e).replace("--", "")


def check_text(prompt: object, mode: str) -> str:
    """The prompt, stripped; text modes need one, the others may leave it empty (the clip prompts)."""
    try:
        return check_prompt(prompt, MAX_PROMPT_CHARS, allow_empty=mode not in (TEXT, MELODY))
    except UserError as e:
        raise AppInputError(_message(e)) from None


def check_seconds(value: object, max_seconds: float, name: str = "duration") -> float:
    try:
        return check_duration(value, min(max_seconds, MAX_SECONDS), name=name)
    except UserError as e:
        raise AppInputError(_message(e)) from None


def _number(value: object, name: str, low: float, high: float, integer: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer and value != int(value):
        ok = False
    if not ok or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise AppInputError(f"{name} must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return int(value) if integer else float(value)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """The sampling controls of the page, checked; MELODY_ONLY's are None in MusicGen's request."""

    seed: int
    cfg: float
    top_k: int
    temperature: float
    steps: int | None = None
    schedule: str | None = None
    top_p: float | None = None
    lm_cfg: float | None = None
    inpaint_candidates: int | None = None


def check_sampling(seed: object, cfg: object, top_k: object, temperature: object, steps: object = None,
                   schedule: object = None, top_p: object = None, lm_cfg: object = None,
                   inpaint_candidates: object = None) -> Sampling:
    if schedule not in (None, *SCHEDULES):
        raise AppInputError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    return Sampling(seed=_number(seed, "seed", 0, 2**31 - 1, integer=True), cfg=_number(cfg, "CFG scale", 0, 100),
                    top_k=_number(top_k, "top-k", 0, 1 << 20, integer=True),
                    temperature=_number(temperature, "temperature", 1e-3, 100),
                    steps=None if steps is None else _number(steps, "DPD steps", 1, 1000, integer=True),
                    schedule=schedule, top_p=None if top_p is None else _number(top_p, "top-p", 1e-3, 1.0),
                    lm_cfg=None if lm_cfg is None else _number(lm_cfg, "LM CFG scale", 0, 100),
                    inpaint_candidates=None if inpaint_candidates is None else _number(
                        inpaint_candidates, "inpainting candidates", 1, MAX_CANDIDATES, integer=True))


def read_clip(path: str | None, sample_rate: int, max_seconds: float) -> np.ndarray:
    """An uploaded clip as mono float32 at `sample_rate`; refuses no file, a non-audio file, and one
    longer than `max_seconds` (its header is read before the samples are)."""
    from data_pipeline.audio_io import BadAudio, decode, duration

    if not path:
        raise AppInputError("this mode needs an audio clip: upload one (wav, flac, ogg, mp3)")
    name = os.path.basename(path)
    try:
        length = duration(path)
        if length > max_seconds:
            raise AppInputError(f"the clip {name} is {length:.1f} s long; the maximum is {max_seconds:g} s")
        return decode(path, sample_rate)
    except BadAudio as e:
        raise AppInputError(f"the clip {name} cannot be used as audio ({e})") from None


def check_span(start: object, end: object, clip_seconds: float) -> tuple[float, float]:
    """An inpainting span [start, end) s that is non-empty and inside the clip."""
    start = _number(start, "span start", -math.inf, math.inf) if start is not None else None
    end = _number(end, "span end", -math.inf, math.inf) if end is not None else None
    if start is None or end is None or not 0 <= start < end <= clip_seconds:
        raise AppInputError(f"the span [{start}, {end}) s must be non-empty and lie within the clip's "
                            f"{clip_seconds:.2f} s")
    return start, end


@dataclasses.dataclass(frozen=True)
class Request:
    """One checked request: what to run, on which model."""

    model: str
    mode: str
    prompt: str
    duration: float
    sampling: Sampling
    clip: np.ndarray | None = dataclasses.field(default=None, compare=False)
    span: tuple[float, float] | None = None

    def batch_key(self) -> tuple | None:
        """Requests with equal keys run as one batch (text → music with equal settings); None: alone."""
        if self.mode != TEXT:
            return None
        return self.model, self.duration, dataclasses.replace(self.sampling, seed=0)


# --- the loaded models -------------------------------------------------------------------------------
@dataclasses.dataclass
class Model:
    """One bundle, loaded once and shared by every request."""

    name: str
    kind: str
    pipeline: Any

    def defaults(self) -> dict[str, Any]:
        """The page's sampling controls as the model samples by default (its bundle's config.sample)."""
        names = ("cfg", "top_k", "temperature") + (MELODY_ONLY if self.kind == "melody" else ())
        return {name: self.pipeline.defaults[name] for name in names}


def load_models(bundles: Sequence[str]) -> dict[str, Model]:
    """{label: Model} with one pipeline per bundle; labels name the bundle and its kind."""
    from melody_jax.pipelines.load import load_pipeline

    if not bundles:
        raise AppInputError("give at least one --bundle")
    models: dict[str, Model] = {}
    for bundle in bundles:
        pipeline = load_pipeline(bundle)
        kind = pipeline.name
        label = f"{KINDS[kind]}: {os.path.normpath(bundle)}"
        if label in models:
            raise AppInputError(f"--bundle={bundle} is given twice")
        models[label] = Model(label, kind, pipeline)
    return models


def parse_request(models: dict[str, Model], max_seconds: float, model: object, mode: object, prompt: object,
                  duration: object, seed: object, steps: object, schedule: object, cfg: object, top_k: object,
                  top_p: object, temperature: object, clip_path: str | None, start: object, end: object,
                  lm_cfg: object = None, inpaint_candidates: object = None) -> Request:
    """A page's fields → a checked Request (the clip decoded), or AppInputError naming what is wrong."""
    if model not in models:
        raise AppInputError(f"choose a model, one of: {', '.join(models)}")
    m = models[model]
    if mode not in MODES[m.kind]:
        raise AppInputError(f"{KINDS[m.kind]} offers the modes {', '.join(MODES[m.kind])}; got {mode!r}")
    text = check_text(prompt, mode)
    seconds = check_seconds(duration, max_seconds)
    if m.kind == "musicgen":
        sampling = check_sampling(seed, cfg, top_k, temperature)
    else:
        sampling = check_sampling(seed, cfg, top_k, temperature, steps, schedule, top_p, lm_cfg, inpaint_candidates)
    clip, span = None, None
    if mode != TEXT:
        clip = read_clip(clip_path, m.pipeline.sample_rate, max_seconds)
        if mode == INPAINT:
            span = check_span(start, end, len(clip) / m.pipeline.sample_rate)
    return Request(model, mode, text, seconds, sampling, clip, span)


# --- running ---------------------------------------------------------------------------------------
def run(model: Model, requests: Sequence[Request]):
    """One pipeline call for `requests` (one, or several of equal batch_key); returns its Result."""
    r, s = requests[0], requests[0].sampling
    if model.kind == "musicgen":
        if len(requests) != 1:
            raise ValueError("MusicGen requests run one at a time")
        return model.pipeline.generate([r.prompt], r.duration, cfg=s.cfg, top_k=s.top_k,
                                       temperature=s.temperature, seed=s.seed,
                                       melody=r.clip if r.mode == MELODY else None)
    melody = model.pipeline
    common = dict(steps=s.steps, cfg=s.cfg, schedule=s.schedule, temperature=s.temperature, top_k=s.top_k,
                  top_p=s.top_p, lm_cfg=s.lm_cfg)
    prompts = [r.prompt] if r.prompt else None
    if r.mode == TEXT:
        return melody.generate([q.prompt for q in requests], r.duration, seed=[q.sampling.seed for q in requests],
                               **common)
    if len(requests) != 1:
        raise ValueError("audio-conditioned requests run one at a time")
    if r.mode == CONTINUE:
        return melody.generate_continuation(r.clip, r.duration, prompts, seed=s.seed, **common)
    if r.mode == INPAINT:
        return melody.inpaint(r.clip, *r.span, prompts, seed=s.seed, inpaint_candidates=s.inpaint_candidates,
                              **common)
    return melody.generate_from_audio_prompt(r.clip, r.duration, seed=s.seed, **common)


def stats_markdown(result, batch: int) -> str:
    """Time and forward passes per stage, and the real-time factor, as a Markdown table."""
    lines = ["| stage | seconds | forward passes |", "|---|---|---|"]
    lines += [f"| {stage} | {t:.3f} | {result.forward_passes.get(stage, '')} |" for stage, t in result.seconds.items()]
    seconds = result.audio.shape[1] / result.sample_rate
    together = f" (one batch of {batch} requests)" if batch > 1 else ""
    lines += ["", f"{seconds:.2f} s of audio at {result.sample_rate} Hz in {sum(result.seconds.values()):.2f} s"
                  f"{together}: real-time factor **{result.real_time_factor:.2f}** (a first request of a new shape "
                  "includes compilation)"]
    return "\n".join(lines)


def write_output(result, row: int, out_dir: str, title: str) -> tuple[str, str]:
    """(WAV, spectrogram PNG) paths for row `row`; the WAV is float32, exactly what the model made."""
    import soundfile as sf

    from melody_jax.evaluation.plots import spectrogram_png

    audio = result.audio[row]
    if not np.isfinite(audio).all():
        raise AppInputError("the model produced NaN or infinite samples; try other settings or another bundle")
    stem = os.path.join(out_dir, uuid.uuid4().hex)
    sf.write(stem + ".wav", audio, result.sample_rate, subtype="FLOAT")
    spectrogram_png(audio, result.sample_rate, stem + ".png", title)
    return stem + ".wav", stem + ".png"


Outputs = tuple[str | None, str | None, str, str]  # audio path, spectrogram path, stats, error


def serve_batch(models: dict[str, Model], max_seconds: float, out_dir: str, fields: Sequence[Sequence[Any]],
                progress: Callable[..., Any] | None = None) -> list[Outputs]:
    """Outputs for each request's page fields: checked, grouped by batch_key, run, written. A problem
    with one request is that request's error line; the others still run."""
    outputs: list[Outputs | None] = [None] * len(fields)
    groups: dict[Any, list[tuple[int, Request]]] = {}
    for i, f in enumerate(fields):
        try:
            req = parse_request(models, max_seconds, *f)
        except UserError as e:
            outputs[i] = (None, None, "", f"error: {e}")
            continue
        groups.setdefault(req.batch_key() or ("alone", i), []).append((i, req))
    for members in groups.values():
        rows, reqs = [i for i, _ in members], [r for _, r in members]
        model = models[reqs[0].model]
        try:
            if progress is not None:
                progress(0, desc=f"{KINDS[model.kind]}: {len(reqs)} request(s)")
            result = run(model, reqs)
            for b, (i, r) in enumerate(zip(rows, reqs)):
                wav, png = write_output(result, b, out_dir, r.prompt or r.mode)
                outputs[i] = (wav, png, stats_markdown(result, len(reqs)), "")
        except UserError as e:
            for i in rows:
                outputs[i] = (None, None, "", f"error: {_message(e)}")
        except Exception as e:  # noqa: BLE001 - a bug must not show the page a traceback; the log has it
            traceback.print_exc(file=sys.stderr)
            for i in rows:
                outputs[i] = (None, None, "", f"error: the generation failed ({type(e).__name__}); see the server log")
    return outputs  # type: ignore[return-value]


class Batcher:
    """Requests wait here while the models are busy; whichever request gets them next runs every
    waiting request (up to `max_batch`, oldest first) through `serve` in one go, and the others pick
    their outputs up. So requests queue one run at a time, the ones that arrived during a run form the
    next batch, and the running request's own progress callback sees the pipeline's stages."""

    def __init__(self, serve: Callable[[list, Any], list], max_batch: int):
        self._serve, self._max = serve, max_batch
        self._pending: list[tuple[Any, Future]] = []
        self._pending_lock, self._run_lock = threading.Lock(), threading.Lock()

    def __call__(self, fields: Any, progress: Callable[..., Any] | None = None) -> Any:
        mine: Future = Future()
        with self._pending_lock:
            self._pending.append((fields, mine))
        while not mine.done():
            with self._run_lock:
                if mine.done():
                    break
                with self._pending_lock:
                    taken, self._pending = self._pending[: self._max], self._pending[self._max:]
                try:
                    outputs = self._serve([f for f, _ in taken], progress)
                except BaseException as e:
                    for _, future in taken:
                        future.set_exception(e)
                    raise
                for (_, future), out in zip(taken, outputs):
                    future.set_result(out)
        return mine.result()


# --- the page --------------------------------------------------------------------------------------
def build_page(models: dict[str, Model], max_seconds: float, max_batch: int):
    """The Gradio Blocks of the listening room."""
    import gradio as gr

    out_dir = tempfile.mkdtemp(prefix="melody-jax-app-")
    first = next(iter(models.values()))
    defaults = first.defaults()

    with gr.Blocks(title="melody-jax listening room", analytics_enabled=False) as page:
        gr.Markdown("# melody-jax listening room\nText → music with the bundles this server loaded. "
                    f"Up to {max_seconds:g} s per request; requests queue, and text prompts that arrive "
                    "together with the same settings are generated as one batch.")
        with gr.Row():
            with gr.Column():
                model = gr.Dropdown(list(models), value=first.name, label="model", elem_id="model")
                mode = gr.Radio(list(MODES[first.kind]), value=TEXT, label="mode", elem_id="mode")
                prompt = gr.Textbox(label="prompt", lines=2, placeholder="e.g. solo piano, slow, C minor",
                                    elem_id="prompt")
                with gr.Row():
                    duration = gr.Number(value=min(5.0, max_seconds), label="duration (s; continuation: s to add)",
                                         elem_id="duration")
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                clip = gr.File(label="audio clip (continuation, inpainting, audio prompt, melody)", type="filepath",
                               elem_id="clip")
                with gr.Row(visible=first.kind == "melody") as span_row:
                    start = gr.Number(value=1.0, label="inpaint from (s)", elem_id="span_start")
                    end = gr.Number(value=2.0, label="inpaint to (s)", elem_id="span_end")
                    candidates = gr.Number(value=defaults.get("inpaint_candidates"), precision=0,
                                           label="inpainting candidates (spans drawn, one kept)",
                                           elem_id="inpaint_candidates")
                with gr.Accordion("sampling", open=True):
                    with gr.Row():
                        cfg = gr.Number(value=defaults["cfg"], label="CFG scale", elem_id="cfg")
                        temperature = gr.Number(value=defaults["temperature"], label="temperature",
                                                elem_id="temperature")
                        top_k = gr.Number(value=defaults["top_k"], precision=0, label="top-k (0: off)",
                                          elem_id="top_k")
                    with gr.Row(visible=first.kind == "melody") as melody_row:
                        steps = gr.Slider(1, 100, value=defaults.get("steps"), step=1, label="DPD steps",
                                          elem_id="steps")
                        schedule = gr.Radio(list(SCHEDULES), value=defaults.get("schedule"), label="DPD schedule",
                                            elem_id="schedule")
                        top_p = gr.Slider(0.01, 1.0, value=defaults.get("top_p"), step=0.01, label="top-p (semantic LM)",
                                          elem_id="top_p")
                        lm_cfg = gr.Number(value=defaults.get("lm_cfg"), label="LM CFG scale (1: off)",
                                           elem_id="lm_cfg")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                error = gr.Markdown("", elem_id="error")
                audio = gr.Audio(label="output", type="filepath", interactive=False, elem_id="output_audio")
                spectrogram = gr.Image(label="log-mel spectrogram", type="filepath", interactive=False,
                                       elem_id="spectrogram")
                stats = gr.Markdown("", elem_id="stats")

        def on_model(name: str):
            m = models[name]
            d = m.defaults()
            return (gr.update(choices=list(MODES[m.kind]), value=TEXT), gr.update(visible=m.kind == "melody"),
                    gr.update(visible=m.kind == "melody"), d["cfg"], d["temperature"], d["top_k"],
                    *(gr.update(value=d[name]) if name in d else gr.update() for name in MELODY_ONLY))

        model.change(on_model, model, [mode, span_row, melody_row, cfg, temperature, top_k, steps, schedule, top_p,
                                       lm_cfg, candidates], queue=False)
        inputs = [model, mode, prompt, duration, seed, steps, schedule, cfg, top_k, top_p, temperature, clip,
                  start, end, lm_cfg, candidates]

        batcher = Batcher(lambda fields, progress: serve_batch(models, max_seconds, out_dir, fields, progress),
                          max_batch)

        # named parameters: Gradio finds a Progress default among positional parameters only
        def generate(model, mode, prompt, duration, seed, steps, schedule, cfg, top_k, top_p, temperature, clip,
                     start, end, lm_cfg, candidates, progress=gr.Progress(track_tqdm=True)):  # tqdm bars show here
            return batcher((model, mode, prompt, duration, seed, steps, schedule, cfg, top_k, top_p, temperature,
                            clip, start, end, lm_cfg, candidates), progress)

        # up to max_batch requests wait in the batcher at once; Gradio's queue holds the rest
        button.click(generate, inputs, [audio, spectrogram, stats, error], concurrency_limit=max_batch,
                     api_name="generate")
    page.queue(max_size=64)
    return page


def main(argv: list[str]) -> None:
    del argv
    from launch.common import quiet_library_logs, run_user_errors

    quiet_library_logs()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    def go() -> None:
        max_seconds = check_seconds(_MAX_DURATION.value, MAX_SECONDS, name="max_duration")
        if _MAX_BATCH.value < 1:
            raise AppInputError(f"--max_batch must be >= 1, got {_MAX_BATCH.value}")
        models = load_models(_BUNDLES.value)
        page = build_page(models, max_seconds, _MAX_BATCH.value)
        print(f"serving {len(models)} model(s) on http://{_HOST.value}:{_PORT.value}", flush=True)
        page.launch(server_name=_HOST.value, server_port=_PORT.value, share=False, ssr_mode=False,
                    max_file_size=f"{_MAX_UPLOAD_MB.value}mb", footer_links=[], quiet=True)

    run_user_errors(go)


if __name__ == "__main__":
    from launch.common import run_app

    run_app(main)
