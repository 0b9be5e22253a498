"""MusicGen sampling (DESIGN §6): one jitted program per window shape, the whole loop in `jax.lax`.

A window of W frames is the pattern sequence of S = pattern.num_steps(W) steps. Slots whose code is
known in advance — empty slots (the special token) and the codes of the prompt frames — are forced;
the rest are drawn. The KV cache is preallocated for the melody prefix plus S inputs; one prefill
call feeds the prefix and every step up to the first step with a free slot, then a `lax.scan` runs
one decoder call per remaining step. Classifier-free guidance runs conditional and unconditional rows
(text and melody both nulled) as one batch of 2B rows: logits = u + cfg_scale · (c − u) (`guide`). Each row
draws from keys folded from (key, window, row, step) with top-k and temperature
(`melody_jax.pipelines.lm_sampling.sample_from_logits`).

Long generation slides the window: the first window takes the user's prompt, each later one keeps
the last `keep_frames` generated frames as its prompt and adds W − keep_frames new ones (the melody
chromagram slides with it). The result is reverted from the pattern: codes `int32 [B, K, T]`, the
prompt frames included unchanged. `Generation.forward_passes` counts decoder calls, each over all
rows (the text encoder runs once more per window).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from melody_jax.diffusion.guidance import guide
from melody_jax.models.musicgen_lm import MusicGenLM, shift_right
from melody_jax.pipelines.lm_sampling import _active_rules, _compute_dtype_params, sample_from_logits
from melody_jax.models.codebook_patterns import Pattern


@dataclasses.dataclass(frozen=True)
class Generation:
    codes: jax.Array  # int32 [B, K, num_frames]
    forward_passes: int  # decoder calls (prefill + steps) over all windows; each covers cond + uncond rows
    windows: int


def first_free_step(pattern: Pattern, num_frames: int, prompt_frames: int) -> int:
    """The first step holding a code after the prompt: steps before it are prefilled in one call."""
    free = pattern.time_of(num_frames) >= prompt_frames
    return int(np.argmax(free.any(axis=0)))


def window_forward_passes(pattern: Pattern, num_frames: int, prompt_frames: int) -> int:
    """Decoder calls for one window: the prefill, then one per remaining step."""
    return pattern.num_steps(num_frames) - first_free_step(pattern, num_frames, prompt_frames)


def _conditions(model: MusicGenLM, params, text_tokens, text_mask, chroma, guided: bool, unconditional: bool = False):
    """Conditions for B rows, or for 2B rows (conditional, then both conditions nulled) when guided;
    `unconditional`: B rows of the null conditions (text and melody dropped)."""
    drop = jnp.ones(text_tokens.shape[:1], bool) if unconditional else None
    if guided:
        b = text_tokens.shape[0]
        text_tokens, text_mask = jnp.concatenate([text_tokens] * 2), jnp.concatenate([text_mask] * 2)
        chroma = None if chroma is None else jnp.concatenate([chroma] * 2)
        drop = jnp.arange(2 * b) >= b
    return model.apply({"params": params}, text_tokens, text_mask, chroma, drop, drop, method=MusicGenLM.conditions)


def _decode(model: MusicGenLM, params, conds, known: jax.Array, fixed: np.ndarray, first: int,
            cfg_scale: float | None, choose, keep_logits: bool):
    """Steps `first..S-1` of a window; choose(guided logits [B, K, V], step) → codes [B, K] for free slots.

    `known [B, K, S]` holds the forced codes where `fixed [K, S]`; returns (sequence, guided logits or None).
    """
    batch, k, steps = known.shape
    context, context_mask, prefix = conds
    rows = (context if context is not None else prefix).shape[0]  # prepend mode: no cross-attention context
    dec = model.clone(decode=True)
    init = functools.partial(dec.init, method=MusicGenLM.logits)
    shapes = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((rows, k, steps), jnp.int32), context,
                            context_mask, prefix)["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    params = _compute_dtype_params(params, jnp.dtype(model.dtype))
    fixed = jnp.asarray(fixed)

    def forward(cache, inputs, *conds):
        inputs = jnp.concatenate([inputs] * (rows // batch))
        logits, updated = dec.apply({"params": params, "cache": cache}, inputs, *conds, mutable=["cache"],
                                    method=MusicGenLM.logits)
        logits = logits[:, :, -1]
        if cfg_scale is not None:
            cond, uncond = logits[:batch], logits[batch:]
            logits = guide(cond, uncond, cfg_scale)
        return updated["cache"], logits

    def pick(logits, step):
        return jnp.where(fixed[:, step], known[:, :, step], choose(logits, step))

    cache, logits = forward(cache, shift_right(known, model.special_token)[:, :, : first + 1], context, context_mask,
                            prefix)
    token = pick(logits, first)

    def step(carry, s):
        cache, token = carry
        cache, logits = forward(cache, token[:, :, None], None, None, None)
        token = pick(logits, s)
        return (cache, token), (token, logits if keep_logits else None)

    _, (rest, rest_logits) = jax.lax.scan(step, (cache, token), jnp.arange(first + 1, steps, dtype=jnp.int32))
    seq = jnp.concatenate([known[:, :, :first], token[:, :, None], rest.transpose(1, 2, 0)], axis=2)
    if not keep_logits:
        return seq, None
    return seq, jnp.concatenate([logits[:, :, None], rest_logits.transpose(1, 2, 0, 3)], axis=2)


@functools.partial(jax.jit, static_argnames=("model", "pattern", "num_frames", "cfg_scale", "temperature", "top_k",
                                             "top_p", "unconditional", "rules"))
def _window(model, params, text_tokens, text_mask, chroma, prompt, key, *, pattern, num_frames, cfg_scale,
            temperature, top_k, top_p, unconditional, rules):
    del rules  # only part of the compilation key
    batch, k, prompt_frames = prompt.shape
    padded = jnp.zeros((batch, k, num_frames), jnp.int32).at[:, :, :prompt_frames].set(prompt)
    known = pattern.build(padded, model.special_token)
    fixed = pattern.time_of(num_frames) < prompt_frames  # empty slots (-1) and prompt codes
    row_keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))

    def choose(logits, step):
        keys = jax.vmap(lambda r: jax.random.fold_in(r, step))(row_keys)
        return jax.vmap(lambda r, row: sample_from_logits(r, row, temperature, top_k, top_p))(keys, logits)

    conds = _conditions(model, params, text_tokens, text_mask, chroma, cfg_scale is not None, unconditional)
    first = first_free_step(pattern, num_frames, prompt_frames)
    seq, _ = _decode(model, params, conds, known, fixed, first, cfg_scale, choose, keep_logits=False)
    return pattern.revert(seq, num_frames)[0]


@functools.partial(jax.jit, static_argnames=("model", "cfg_scale", "rules"))
def _teacher_forced(model, params, text_tokens, text_mask, chroma, seq, *, cfg_scale, rules):
    del rules
    conds = _conditions(model, params, text_tokens, text_mask, chroma, cfg_scale is not None)
    fixed = np.ones(seq.shape[1:], bool)
    return _decode(model, params, conds, seq, fixed, 0, cfg_scale, lambda logits, s: seq[:, :, s], True)[1]


def teacher_forced_logits(model: MusicGenLM, params, seq: jax.Array, text_tokens: jax.Array, text_mask: jax.Array,
                          chroma: jax.Array | None = None, cfg_scale: float | None = None) -> jax.Array:
    """float32 [B, K, S, V]: the sampler's cached (guided, if cfg_scale) logits with `seq` fed step by step.

    Without guidance it equals `model.apply(params, seq, text_tokens, text_mask, chroma)`.
    """
    return _teacher_forced(model, params, jnp.asarray(text_tokens, jnp.int32), jnp.asarray(text_mask, bool),
                           None if chroma is None else jnp.asarray(chroma, jnp.float32), jnp.asarray(seq, jnp.int32),
                           cfg_scale=None if cfg_scale is None else float(cfg_scale), rules=_active_rules())


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
             melody_frames: int | None = None, unconditional: bool = False) -> Generation:
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
    settings = dict(pattern=pattern, cfg_scale=None if cfg_scale is None or unconditional else float(cfg_scale),
                    temperature=float(temperature), top_k=0 if nucleus else int(top_k),
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
        passes += window_forward_passes(pattern, frames, window_prompt.shape[2])
        windows += 1
        start = codes.shape[2] - keep_frames
    return Generation(codes, passes, windows)

