"""MusicGen sampling (DESIGN §6): one jitted program per window shape, the whole loop in `jax.lax`.

A window of W frames is the pattern sequence of S = pattern.num_steps(W) steps. Slots whose code is
known in advance — empty slots (the special token) and the codes of the prompt frames — are forced;
the rest are drawn. The KV cache is preallocated for the melody prefix plus S inputs; one prefill
call feeds the prefix and every step up to the first step with a free slot, then a `lax.scan` runs
one decoder call per remaining step. Classifier-free guidance runs conditional and unconditional rows
(text and melody both nulled) as one batch of 2B rows: logits = u + cfg_scale · (c − u) (`guide`);
audiocraft's options: `two_step_cfg` runs the branches as separate calls with their own caches, and
`cfg_beta` adds a third branch (text nulled, melody kept) for MusicGen-Style's double guidance. Each row
draws from keys folded from (key, window, row, step) with top-k or top-p and temperature
(`melody_jax.pipelines.lm_sampling.sample_from_logits`).

Long generation slides the window: the first window takes the user's prompt, each later one keeps
the last `keep_frames` generated frames as its prompt and adds W − keep_frames new ones (the melody
chromagram slides with it). The result is reverted from the pattern: codes `int32 [B, K, T]`, the
prompt frames included unchanged. `Generation.forward_passes` counts decoder calls, each over all
rows of its branch (the text encoder runs once more per window).
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from melody_jax.diffusion.guidance import guide
from melody_jax.models.musicgen_lm import MusicGenLM, shift_right
from melody_jax.nn import skinny
from melody_jax.pipelines.lm_sampling import _active_rules, _compute_dtype_params, sample_from_logits
from melody_jax.models.codebook_patterns import Pattern


@dataclasses.dataclass(frozen=True)
class Generation:
    codes: jax.Array  # int32 [B, K, num_frames]
    forward_passes: int  # decoder calls (prefill + steps) over all windows; one per guidance branch if two-step
    windows: int


def first_free_step(pattern: Pattern, num_frames: int, prompt_frames: int) -> int:
    """The first step holding a code after the prompt: steps before it are prefilled in one call."""
    free = pattern.time_of(num_frames) >= prompt_frames
    return int(np.argmax(free.any(axis=0)))


def window_forward_passes(pattern: Pattern, num_frames: int, prompt_frames: int) -> int:
    """Decoder calls for one window: the prefill, then one per remaining step."""
    return pattern.num_steps(num_frames) - first_free_step(pattern, num_frames, prompt_frames)


def _conditions(model: MusicGenLM, params, text_tokens, text_mask, chroma, branches: int):
    """Conditions for `branches` × B rows, branch by branch: 1 the given conditions; 2 (CFG) those, then
    both nulled; 3 (double CFG) those, then the text nulled (melody kept), then both nulled. Branches
    0 means one branch of the null conditions (unconditional sampling)."""
    b = text_tokens.shape[0]
    drops = {0: ((True,), (True,)), 1: ((False,), (False,)), 2: ((False, True), (False, True)),
             3: ((False, True, True), (False, False, True))}[branches]
    n = len(drops[0])
    drop_text, drop_melody = (jnp.repeat(jnp.asarray(d), b) for d in drops)
    text_tokens, text_mask = jnp.concatenate([text_tokens] * n), jnp.concatenate([text_mask] * n)
    chroma = None if chroma is None else jnp.concatenate([chroma] * n)
    return model.apply({"params": params}, text_tokens, text_mask, chroma, drop_text, drop_melody,
                       method=MusicGenLM.conditions)


def _combine(logits: list[jax.Array], cfg_scale: float | None, cfg_beta: float | None) -> jax.Array:
    """The branches' logits → the logits sampled from: c; CFG u + s·(c − u) (`guide`); double CFG
    (audiocraft's `cfg_coef_beta`, MusicGen-Style §4.3) u + s·(w + β·(c − w) − u), w = melody only."""
    if cfg_scale is None:
        return logits[0]
    if cfg_beta is None:
        return guide(logits[0], logits[1], cfg_scale)
    return guide(guide(logits[0], logits[1], cfg_beta), logits[2], cfg_scale)


def _decode(model: MusicGenLM, params, conds, known: jax.Array, fixed: np.ndarray, first: int, combine,
            two_step: bool, choose, keep_logits: bool):
    """Steps `first..S-1` of a window; choose(logits [B, K, V], step) → codes [B, K] for free slots.

    `conds` hold n branches of B rows each and combine(n logits [B, K, V]) gives the logits sampled
    from. One pass runs the n·B rows as one batch with one KV cache; `two_step` (audiocraft's
    `two_step_cfg`) runs each branch as its own call with its own cache. `known [B, K, S]` holds the
    forced codes where `fixed [K, S]`; returns (sequence, combined logits or None).
    """
    batch, k, steps = known.shape
    context, _, prefix = conds
    rows = (context if context is not None else prefix).shape[0]  # prepend mode: no cross-attention context
    branches = rows // batch
    groups = [(g * batch, (g + 1) * batch) for g in range(branches)] if two_step else [(0, rows)]
    sliced = [tuple(None if c is None else c[lo:hi] for c in conds) for lo, hi in groups]
    dec = model.clone(decode=True)
    init = functools.partial(dec.init, method=MusicGenLM.logits)

    def empty_cache(group_conds, group_rows):
        shapes = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((group_rows, k, steps), jnp.int32),
                                *group_conds)["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    caches = [empty_cache(c, hi - lo) for c, (lo, hi) in zip(sliced, groups)]
    params = _compute_dtype_params(params, jnp.dtype(model.dtype))
    fixed = jnp.asarray(fixed)

    def forward(caches, inputs, prefill: bool):
        out, updated = [], []
        for cache, (lo, hi), group_conds in zip(caches, groups, sliced):
            tiled = jnp.concatenate([inputs] * ((hi - lo) // batch))
            logits, new = dec.apply({"params": params, "cache": cache}, tiled,
                                    *(group_conds if prefill else (None, None, None)), mutable=["cache"],
                                    method=MusicGenLM.logits)
            out.append(logits[:, :, -1])
            updated.append(new["cache"])
        logits = jnp.concatenate(out)
        return updated, combine([logits[i * batch:(i + 1) * batch] for i in range(branches)])

    def pick(logits, step):
        return jnp.where(fixed[:, step], known[:, :, step], choose(logits, step))

    caches, logits = forward(caches, shift_right(known, model.special_token)[:, :, : first + 1], True)
    token = pick(logits, first)

    def step(carry, s):
        caches, token = carry
        with skinny.routing():  # a step's products have a few rows: the CPU kernel reads each weight once
            caches, logits = forward(caches, token[:, :, None], False)
        token = pick(logits, s)
        return (caches, token), (token, logits if keep_logits else None)

    _, (rest, rest_logits) = jax.lax.scan(step, (caches, token), jnp.arange(first + 1, steps, dtype=jnp.int32))
    seq = jnp.concatenate([known[:, :, :first], token[:, :, None], rest.transpose(1, 2, 0)], axis=2)
    if not keep_logits:
        return seq, None
    return seq, jnp.concatenate([logits[:, :, None], rest_logits.transpose(1, 2, 0, 3)], axis=2)


def _branches(cfg_scale: float | None, cfg_beta: float | None, unconditional: bool) -> int:
    """How many condition branches a step runs (see `_conditions`)."""
    if unconditional:
        return 0
    return 1 if cfg_scale is None else 2 if cfg_beta is None else 3


@functools.partial(jax.jit, static_argnames=("model", "pattern", "num_frames", "cfg_scale", "cfg_beta", "two_step",
                                             "temperature", "top_k", "top_p", "unconditional", "rules"))
def _window(model, params, text_tokens, text_mask, chroma, prompt, key, *, pattern, num_frames, cfg_scale, cfg_beta,
            two_step, temperature, top_k, top_p, unconditional, rules):
    del rules  # only part of the compilation key
    batch, k, prompt_frames = prompt.shape
    padded = jnp.zeros((batch, k, num_frames), jnp.int32).at[:, :, :prompt_frames].set(prompt)
    known = pattern.build(padded, model.special_token)
    fixed = pattern.time_of(num_frames) < prompt_frames  # empty slots (-1) and prompt codes
    row_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))

    def choose(logits, step):
        keys = jax.vmap(lambda r: jax.random.fold_in(r, step))(row_keys)
        return jax.vmap(lambda r, row: sample_from_logits(r, row, temperature, top_k, top_p))(keys, logits)

    conds = _conditions(model, params, text_tokens, text_mask, chroma, _branches(cfg_scale, cfg_beta, unconditional))
    first = first_free_step(pattern, num_frames, prompt_frames)
    combine = functools.partial(_combine, cfg_scale=cfg_scale, cfg_beta=cfg_beta)
    seq, _ = _decode(model, params, conds, known, fixed, first, combine, two_step, choose, keep_logits=False)
    return pattern.revert(seq, num_frames)[0]


@functools.partial(jax.jit, static_argnames=("model", "cfg_scale", "cfg_beta", "two_step", "rules"))
def _teacher_forced(model, params, text_tokens, text_mask, chroma, seq, *, cfg_scale, cfg_beta, two_step, rules):
    del rules
    conds = _conditions(model, params, text_tokens, text_mask, chroma, _branches(cfg_scale, cfg_beta, False))
    fixed = np.ones(seq.shape[1:], bool)
    combine = functools.partial(_combine, cfg_scale=cfg_scale, cfg_beta=cfg_beta)
    return _decode(model, params, conds, seq, fixed, 0, combine, two_step, lambda logits, s: seq[:, :, s], True)[1]


def teacher_forced_logits(model: MusicGenLM, params, seq: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
                          chroma: jax.Array | None = None, cfg_scale: float | None = None,
                          cfg_beta: float | None = None, two_step_cfg: bool = False) -> jax.Array:
    """float32 [B, K, S, V]: the sampler's cached (guided, if cfg_scale) logits with `seq` fed step by step.

    Without guidance it equals `model.apply(params, seq, text_tokens, text_mask, chroma)`.
    """
    return _teacher_forced(model, params, jnp.asarray(text_tokens, jnp.int32), jnp.asarray(text_mask, bool),
                           None if chroma is None else jnp.asarray(chroma, jnp.float32), jnp.asarray(seq, jnp.int32),
                           **_guidance(model, cfg_scale, cfg_beta, two_step_cfg, False), rules=_active_rules())


def _guidance(model: MusicGenLM, cfg_scale: float | None, cfg_beta: float | None, two_step_cfg: bool,
              unconditional: bool) -> dict:
    """The guidance settings as static arguments; double CFG needs a melody model and CFG."""
    if cfg_beta is not None and not (model.use_melody and cfg_scale is not None and math.isfinite(cfg_beta)):
        raise ValueError(f"cfg_beta={cfg_beta} (double CFG on text vs. melody) needs a melody model, a cfg scale "
                         f"and a finite beta")
    if cfg_scale is None or unconditional:
        return dict(cfg_scale=None, cfg_beta=None, two_step=False)
    return dict(cfg_scale=float(cfg_scale), cfg_beta=None if cfg_beta is None else float(cfg_beta),
                two_step=bool(two_step_cfg))


def _chroma_window(chroma: jax.Array | None, start_frame: int, chroma_hop_frames: float, melody_frames: int | None):
    """The `melody_frames` chroma rows (None: all that remain) of a window starting at `start_frame`, edge-padded."""
    if chroma is None:
        return None
    start = min(int(start_frame // chroma_hop_frames), chroma.shape[1] - 1)
    rows = melody_frames or chroma.shape[1] - start
    index = np.minimum(np.arange(start, start + rows), chroma.shape[1] - 1)
    return chroma[:, index]


def generate(model: MusicGenLM, params, pattern: Pattern, text_tokens: jax.Array, text_mask: jax.Array,
             num_frames: int, key: jax.Array, *, chroma: jax.Array | None = None, prompt: jax.Array | None = None,
             cfg_scale: float | None = 3.0, top_k: int = 250, temperature: float = 1.0, top_p: float = 0.0,
             window_frames: int | None = None, keep_frames: int = 0, chroma_hop_frames: float = 1,
             melody_frames: int | None = None, unconditional: bool = False, cfg_beta: float | None = None,
             two_step_cfg: bool = False) -> Generation:
    """Codes `int32 [B, K, num_frames]` for byte-tokenized text `[B, L]` (+ mask), starting with `prompt`.

    `prompt [B, K, P]` (P < num_frames) is kept as the first P frames (continuation). `chroma
    [B, Fc, 12]` covers the whole generation, one row per `chroma_hop_frames` frames; each window
    reads the `melody_frames` rows (the model's prefix length) from its start, or with `melody_frames`
    None (musicgen-melody, whose chroma frames need not align with codec frames) all rows from the
    one its start falls in. Generations longer
    than `window_frames` slide the window, keeping `keep_frames` frames as the next prompt.
    `cfg_scale=None` disables guidance; temperature 0 is greedy; top_k 0 disables the filter;
    0 < top_p ≤ 1 samples the nucleus of that mass instead of the top-k (audiocraft's rule; 0 = off).
    `unconditional` samples the null conditions (text and melody dropped; guidance is then moot).
    `cfg_beta` (a melody model) guides twice: u + s·(w + β·(c − w) − u), w the logits with the text
    nulled and the melody kept (audiocraft's `cfg_coef_beta`); `two_step_cfg` runs the branches as
    separate calls with their own KV caches instead of one batch (the same logits, more calls).
    """
    prompt = jnp.zeros(text_tokens.shape[:1] + (model.num_codebooks, 0), jnp.int32) if prompt is None else prompt
    prompt = jnp.asarray(prompt, jnp.int32)
    configured = window_frames or num_frames
    window = min(configured, num_frames)  # a generation shorter than the window never slides
    hop = window - keep_frames
    if (prompt.shape[2] >= window or not 0 <= keep_frames < configured or temperature < 0 or top_k < 0
            or not 0 <= top_p <= 1):
        raise ValueError(f"need prompt frames ({prompt.shape[2]}) < window ({window}), 0 <= keep_frames "
                         f"({keep_frames}) < window_frames ({configured}), temperature >= 0, top_k >= 0, "
                         f"0 <= top_p <= 1")
    if chroma is not None and window < num_frames and melody_frames and hop % chroma_hop_frames:
        raise ValueError(f"the window hop {hop} frames must be a multiple of chroma_hop_frames={chroma_hop_frames}")
    chroma = None if chroma is None else jnp.asarray(chroma, jnp.float32)
    nucleus = top_p > 0
    guidance = _guidance(model, cfg_scale, cfg_beta, two_step_cfg, unconditional)
    calls = _branches(guidance["cfg_scale"], guidance["cfg_beta"], unconditional) if guidance["two_step"] else 1
    settings = dict(pattern=pattern, **guidance, temperature=float(temperature), top_k=0 if nucleus else int(top_k),
                    top_p=float(top_p) if nucleus else 1.0, unconditional=bool(unconditional), rules=_active_rules())
    text_tokens, text_mask = jnp.asarray(text_tokens, jnp.int32), jnp.asarray(text_mask, bool)
    codes, start, passes, windows = prompt, 0, 0, 0
    while codes.shape[2] < num_frames:
        window_prompt = codes[:, :, start:]
        # the last window is cut to what is still missing (one more compiled shape, fewer passes)
        frames = min(window, window_prompt.shape[2] + num_frames - codes.shape[2])
        out = _window(model, params, text_tokens, text_mask, _chroma_window(chroma, start, chroma_hop_frames,
                                                                            melody_frames),
                      window_prompt, jax.random.fold_in(key, windows), num_frames=frames, **settings)
        codes = jnp.concatenate([codes, out[:, :, window_prompt.shape[2]:]], axis=2)
        passes += calls * window_forward_passes(pattern, frames, window_prompt.shape[2])
        windows += 1
        start = codes.shape[2] - keep_frames
    return Generation(codes, passes, windows)

