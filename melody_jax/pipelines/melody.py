"""MeLoDy end to end (DESIGN §1, §4.6): text or audio → MuLan tokens → semantic LM → DPD → VAE decoder.

Durations beyond one DPD window use Algorithm 2: the LM and the DPD move in lockstep by M_ST tokens
(L_M = M_ST · frames-per-token latent frames) per step, so the audio can be continued to any length.
Given audio (continuation, inpainting) is encoded by the frozen VAE and tokenised by SSL + k-means;
its latents come back unchanged wherever they are known. Row b of a batch draws all its randomness
from `seed_b` (an int seed s gives row b the seed s + b), so a batch equals its rows run one by one.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from melody_jax.diffusion.angles import SCHEDULES
from melody_jax.pipelines.bundle import check_fit, read_configs
from melody_jax.pipelines.dpd_sampling import (continue_sampled_latents, inpaint_plan, inpaint_sampled_latents,
                                               inpaint_windows, sample_defaults, sample_latents)
from melody_jax.pipelines.generation import AudioInputError, Generator, Result
from melody_jax.models.semantic_lm import NULL_CODE
from melody_jax.pipelines.lm_sampling import continue_tokens, continue_windows, sample, teacher_forced_logits
from melody_jax.pipelines.stages import frames
from melody_jax.pipelines.validation import MAX_PROMPT_CHARS, MAX_SECONDS, check_duration, check_prompt
from melody_jax.training.errors import UserError
from melody_jax.frozen.loader import load_stage
from melody_jax.frozen.mulan import FrozenMuLan
from melody_jax.frozen.semantic import SemanticTokenizer
from melody_jax.frozen.vae import FrozenVAE
from melody_jax.training.sharding import DEFAULT_RULES, activate, make_mesh


def row_keys(seed: int | Sequence[int], batch: int) -> jax.Array:
    seeds = [seed + b for b in range(batch)] if isinstance(seed, (int, np.integer)) else list(seed)
    if len(seeds) != batch:
        raise AudioInputError(f"got {len(seeds)} seeds for {batch} prompts")
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def inpaint_span(num_samples: int, hop: int, sample_rate: int, start_s: float, end_s: float) -> tuple[int, float]:
    """(samples kept: whole tokens of `hop`, the span's end within them) for a span the user gave in
    the file's own length; an end in the trailing part-token (e.g. the file's length) means its end."""
    length = num_samples / sample_rate
    if not 0 <= start_s < end_s <= length:
        raise AudioInputError(f"inpainting span [{start_s:g}, {end_s:g}) s must lie within the audio's "
                              f"{length:g} s and be non-empty")
    kept = num_samples // hop * hop
    if start_s >= kept / sample_rate:
        raise AudioInputError(f"inpainting span [{start_s:g}, {end_s:g}) s starts in the audio's last "
                              f"{(num_samples - kept) / sample_rate:g} s, shorter than one token")
    return kept, min(end_s, kept / sample_rate)


def fold(keys: jax.Array, data: int) -> jax.Array:
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


class MeLoDy(Generator):
    """A loaded bundle; every method samples with jit-compiled `lax` loops on `mesh` (default: one
    device; pass a mesh to shard the stages' parameters by their logical axes). Sampling defaults
    come from the bundle's `dpd` config `sample` block (`dpd_sampling.sample_defaults`); `schedule`
    replaces its DPD angle schedule: "paper" (the paper's proposed one) or "uniform" (its ablation)."""

    name = "melody"

    def __init__(self, bundle: str, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES,
                 progress: bool = True, schedule: str | None = None):
        if schedule not in (None, *SCHEDULES):
            raise UserError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        self.configs = configs = read_configs(bundle)  # the stages' configs (the stage-quality table reads them)
        check_fit(configs)
        self.defaults = sample_defaults(configs["dpd"])
        self.defaults["schedule"] = schedule or self.defaults["schedule"]
        # default: one device — a sampling batch of a few prompts gains nothing from being split
        self.mesh = mesh or make_mesh({"data": 1}, jax.devices()[:1])
        self.rules, self.progress = rules, progress
        path = lambda stage: os.path.join(bundle, stage)  # noqa: E731
        with activate(self.mesh, rules):
            self.vae = FrozenVAE.load(path("vae_gan"), self.mesh, rules)
            self.tokenizer = SemanticTokenizer.load(path("kmeans"), path("ssl"), self.mesh, rules)
            self.mulan = FrozenMuLan.load(path("mulan"), path("rvq"), self.mesh, rules)
            lm = load_stage(path("semantic_lm"), "semantic_lm", self.mesh, rules, field="semantic_lm")
            dpd = load_stage(path("dpd"), "dpd", self.mesh, rules, field="dpd")
        self.lm, self.lm_params, self.dpd, self.dpd_params = lm.model, lm.params, dpd.model, dpd.params
        self.sample_rate = self.vae.sample_rate
        self.frames_per_token = self.tokenizer.hop // self.vae.hop
        self.token_rate = self.sample_rate / self.tokenizer.hop
        self.lm_window = lm.config.data.semantic_len
        self.window_tokens = dpd.config.data.token_length
        self.chunk_tokens = math.ceil(self.window_tokens / dpd.config.model.num_chunks)  # M_ST
        # The LM moves by M_ST tokens too, but within its own window: each step sees its last lm_window − M_ST
        # tokens, however long the DPD's window (a longer LM window keeps a slow beat across steps).
        self.lm_context = max(0, self.lm_window - self.chunk_tokens)

    # --- public API -----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[str], duration_s: float | None = None, seed: int | Sequence[int] = 0,
                 **sampling) -> Result:
        """Text → music of `duration_s` seconds for each prompt."""
        s = self.settings(duration_s, **sampling)
        prompts = [check_prompt(p, MAX_PROMPT_CHARS) for p in prompts]
        duration = check_duration(s["duration"], MAX_SECONDS)
        return self._run(lambda: self.mulan.text_tokens(prompts), len(prompts), None, None, duration, seed, s)

    def generate_from_audio_prompt(self, audio: np.ndarray, duration_s: float | None = None,
                                   seed: int | Sequence[int] = 0, **sampling) -> Result:
        """Music prompting: the MuLan audio tower embeds `audio` [B, T] instead of a text."""
        s = self.settings(duration_s, **sampling)
        audio = self._check_audio(audio, min_seconds=0.0)
        duration = check_duration(s["duration"], MAX_SECONDS)
        return self._run(lambda: self.mulan.audio_tokens(audio), len(audio), None, None, duration, seed, s)

    def generate_continuation(self, audio: np.ndarray, duration_s: float | None = None,
                              prompts: Sequence[str] | None = None, seed: int | Sequence[int] = 0,
                              **sampling) -> Result:
        """`audio` [B, T] (trimmed to whole tokens) followed by `duration_s` new seconds; the prompt is
        the text given, else the audio itself (MuLan audio tower). Its latents are kept unchanged."""
        s = self.settings(duration_s, **sampling)
        audio = self._check_audio(audio, min_seconds=1 / self.token_rate)
        audio = audio[:, : audio.shape[1] // self.tokenizer.hop * self.tokenizer.hop]
        extra = check_duration(s["duration"], MAX_SECONDS, name="extra")
        prefix = self._prefix(prompts, audio)
        total = audio.shape[1] / self.sample_rate + extra
        return self._run(prefix, len(audio), self.vae.encode(audio), self.tokenizer(audio), total, seed, s)

    def continue_tokens(self, audio: np.ndarray, num_tokens: int, seed: int | Sequence[int] = 0,
                        **sampling) -> np.ndarray:
        """The semantic LM alone: int [B, num_tokens] tokens after those of `audio` [B, T], prompted by its
        MuLan audio tokens — the tokens `generate_continuation` (same seed and settings) would render. What the
        LM does with a beat, measured before the DPD (`evaluation.stage_quality`)."""
        s = self._checked(self.settings(None, **sampling))
        audio = self._check_audio(audio, min_seconds=1 / self.token_rate)
        audio = audio[:, : audio.shape[1] // self.tokenizer.hop * self.tokenizer.hop]
        if int(num_tokens) < 1:
            raise UserError(f"num_tokens must be >= 1, got {num_tokens}")
        with activate(self.mesh, self.rules):
            context = np.asarray(self.tokenizer(audio))
            return np.asarray(self._lm(self.mulan.audio_tokens(audio), context, num_tokens,
                                       fold(row_keys(seed, len(audio)), 1), s))

    def generate_from_tokens(self, tokens: np.ndarray, seed: int | Sequence[int] = 0, **sampling) -> Result:
        """Semantic tokens int [B, T] → audio, with no MuLan or LM: the DPD (one window, then continuation
        chunks; tokens past the last whole chunk are dropped) and the decoder. Resynthesis: what the DPD makes of
        given tokens — the same seed renders a `generate` result's tokens into its audio."""
        s = self.settings(None, **sampling)
        tokens = np.asarray(tokens)
        vocab = self.tokenizer.vocab_size
        if (tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer)
                or tokens.min() < 0 or tokens.max() >= vocab):
            raise AudioInputError(f"need semantic tokens int [batch, time] in [0, {vocab}), got {tokens.dtype} "
                                  f"{list(tokens.shape)}")
        n, window = tokens.shape[1], self.window_tokens
        n = n if n <= window else window + (n - window) // self.chunk_tokens * self.chunk_tokens  # whole chunks
        duration = check_duration(n / self.token_rate, MAX_SECONDS)
        empty = lambda: jnp.zeros((len(tokens), 0), jnp.int32)  # noqa: E731 - no MuLan tokens: the LM is not run
        return self._run(empty, len(tokens), None, tokens[:, :n].astype(np.int32), duration, seed, s)

    def inpaint(self, audio: np.ndarray, start_s: float, end_s: float, prompts: Sequence[str] | None = None,
                seed: int | Sequence[int] = 0, **sampling) -> Result:
        """Regenerates [start_s, end_s) of `audio` [B, T] (widened to whole tokens); the latents outside
        stay as encoded. The span's semantic tokens see both sides (`_span_tokens`); the DPD fills the
        span window by window (`dpd_sampling.inpaint_plan`), each window the DPD's trained length."""
        s = self._checked(self.settings(**sampling))
        audio = self._check_audio(audio, min_seconds=1 / self.token_rate)
        samples, end_s = inpaint_span(audio.shape[1], self.tokenizer.hop, self.sample_rate, start_s, end_s)
        audio = audio[:, :samples]
        keys = row_keys(seed, len(audio))
        t0, t1 = int(math.floor(start_s * self.token_rate)), frames(end_s, self.token_rate)
        seconds: dict[str, float] = {}
        with activate(self.mesh, self.rules):
            prefix = self._timed(seconds, "mulan", self._prefix(prompts, audio))
            tokens = np.asarray(self.tokenizer(audio))
            z = self.vae.encode(audio)
            new = self._timed(seconds, "semantic_lm", lambda: self._span_tokens(
                prefix, tokens[:, :t0], tokens[:, t1:t1 + self.chunk_tokens], t1 - t0, keys, s))
            tokens = np.concatenate([tokens[:, :t0], np.asarray(new), tokens[:, t1:]], axis=1)
            plan = inpaint_plan(tokens.shape[1], t0, t1, self.window_tokens, self.chunk_tokens)
            z = self._timed(seconds, "dpd", lambda: inpaint_windows(
                self.dpd, self.dpd_params, z, jnp.asarray(tokens), jnp.asarray(plan), fold(keys, 2), s["cfg"],
                window_tokens=int(min(self.window_tokens, tokens.shape[1])), frames_per_token=self.frames_per_token,
                num_steps=s["steps"], schedule=s["schedule"]))
            audio_out = self._timed(seconds, "vae_decode", lambda: self.vae.decode(z))
        scored = min(self.chunk_tokens, tokens.shape[1] - t1) if s["inpaint_candidates"] > 1 else 0
        # the candidates are one batch; scoring the right context is one teacher-forced call per token
        passes = {"mulan": 1, "semantic_lm": t1 - t0 + scored, "dpd": s["steps"] * len(plan), "vae_decode": 1}
        return Result(np.asarray(audio_out), self.sample_rate, seconds, passes, np.asarray(z), tokens,
                      np.asarray(prefix))

    def _span_tokens(self, prefix, left: np.ndarray, right: np.ndarray, num_new: int, keys,
                     s: dict[str, Any]) -> jax.Array:
        """`num_new` tokens between `left` and `right` (the first right tokens, ≤ M_ST) for a causal LM.

        Sampling-importance-resampling: `inpaint_candidates` spans are drawn after the left context
        (as continuation draws, window by window), each is weighted by the LM's likelihood of `right`
        after it, p(right | left, span), and one is drawn per row in proportion to that weight (Gumbel-
        max with the row's key): as candidates grow this draws from p(span | left, right). One
        candidate, or no right context, is the left context alone.
        """
        count, batch = s["inpaint_candidates"], left.shape[0]
        context = self._context(left)  # repeated per candidate below: only what the LM reads
        if count == 1 or right.shape[1] == 0:
            return self._lm(prefix, context, num_new, fold(keys, 1), s)
        repeat = lambda x: jnp.concatenate([jnp.asarray(x)] * count)  # noqa: E731 - candidate-major rows
        candidate_keys = jnp.concatenate([fold(fold(keys, 1), c) for c in range(count)])
        spans = np.asarray(self._lm(repeat(prefix), np.asarray(repeat(context)), num_new, candidate_keys, s))
        weights = self._log_likelihood(repeat(prefix), np.concatenate([np.asarray(repeat(left)), spans], axis=1),
                                       np.asarray(repeat(right))).reshape(count, batch)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (count,)))(fold(keys, 3))  # [B, count]
        chosen = np.asarray(jnp.argmax(weights.T + gumbel, axis=1))
        return jnp.asarray(spans.reshape(count, batch, num_new)[chosen, np.arange(batch)])

    def _context(self, tokens: np.ndarray) -> np.ndarray:
        """The last `lm_context` tokens of `tokens` [B, T] (all of them when fewer): what an LM window sees."""
        return tokens[:, max(0, tokens.shape[1] - self.lm_context):]

    def _log_likelihood(self, prefix, before: np.ndarray, tokens: np.ndarray) -> jax.Array:
        """float32 [B]: log p(tokens | prefix ⊕ the last `lm_context` tokens of `before`) under the LM."""
        context = jnp.asarray(self._context(before))
        logits = teacher_forced_logits(self.lm, self.lm_params, jnp.concatenate([prefix, context], axis=1), tokens)
        picked = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), jnp.asarray(tokens)[..., None], axis=-1)
        return picked[..., 0].sum(axis=1)

    # --- the shared path ------------------------------------------------------------------------
    def _checked(self, s: dict[str, Any]) -> dict[str, Any]:
        if (s["steps"] < 1 or not math.isfinite(s["cfg"]) or s["schedule"] not in SCHEDULES
                or s["inpaint_candidates"] < 1 or not math.isfinite(s["lm_cfg"])):
            raise AudioInputError(f"need steps >= 1, a finite cfg and lm_cfg, a schedule in {SCHEDULES} and "
                                  f"inpaint_candidates >= 1, got steps={s['steps']}, cfg={s['cfg']}, "
                                  f"lm_cfg={s['lm_cfg']}, schedule={s['schedule']!r}, "
                                  f"inpaint_candidates={s['inpaint_candidates']}")
        if s["lm_cfg"] != 1 and not self.lm.null_prefix:
            raise AudioInputError(f"lm_cfg={s['lm_cfg']} needs a semantic LM trained with model.cfg_dropout > 0; "
                                  "this bundle's has no null prefix (use lm_cfg=1)")
        return s

    def _run(self, prefix_fn, batch: int, z0, tokens0, duration: float, seed, s: dict[str, Any]) -> Result:
        s = self._checked(s)
        keys = row_keys(seed, batch)
        known = 0 if tokens0 is None else tokens0.shape[1]
        wanted = frames(duration, self.token_rate)
        total = self._token_plan(known, wanted)
        seconds: dict[str, float] = {}
        stages = tqdm(["mulan", "semantic_lm", "dpd", "vae_decode"], disable=not self.progress, leave=False)
        with activate(self.mesh, self.rules):
            stages.set_description("mulan")
            prefix = self._timed(seconds, "mulan", prefix_fn)
            stages.update(1)
            stages.set_description("semantic_lm")
            context = np.zeros((batch, 0), np.int32) if tokens0 is None else np.asarray(tokens0)
            new = self._timed(seconds, "semantic_lm", lambda: self._lm(
                prefix, context, total - known, fold(keys, 1), s))
            tokens = np.concatenate([context, np.asarray(new)], axis=1)
            stages.update(1)
            stages.set_description("dpd")
            z = self._timed(seconds, "dpd", lambda: self._latents(z0, tokens, fold(keys, 2), s))
            stages.update(1)
            stages.set_description("vae_decode")
            audio = self._timed(seconds, "vae_decode", lambda: self.vae.decode(z))
            stages.update(1)
        stages.close()
        samples = int(round(duration * self.sample_rate))
        rendered = 0 if z0 is None else z0.shape[1] // self.frames_per_token  # tokens whose latents are given
        windows = max(0, total - max(rendered, self.window_tokens)) // self.chunk_tokens
        # CFG runs both branches as one batched call per step
        passes = {"mulan": 1, "semantic_lm": total - known, "dpd": s["steps"] * (1 + windows), "vae_decode": 1}
        return Result(np.asarray(audio)[:, :samples], self.sample_rate, seconds, passes, np.asarray(z), tokens,
                      np.asarray(prefix))

    def _token_plan(self, known: int, wanted: int) -> int:
        """Tokens to generate up to: `wanted`, or, beyond one window, whole continuation chunks."""
        start = max(known, self.window_tokens)
        if wanted <= start:
            return max(wanted, known)
        return start + math.ceil((wanted - start) / self.chunk_tokens) * self.chunk_tokens

    def _lm(self, prefix, context: np.ndarray, num_new: int, keys, s: dict[str, Any]) -> jax.Array:
        """num_new semantic tokens after `context`, window by window (each sees ≤ lm_context tokens):
        the first windows one call each (from scratch, or while the context is still short), all
        whole windows after them in one `lax.scan`, then a last partial window."""
        sampling = dict(temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"])
        if s["lm_cfg"] != 1:  # guided against the null prefix, the LM's unconditional branch
            sampling.update(null_prefix=np.full(np.shape(prefix), NULL_CODE, np.int32), cfg_scale=s["lm_cfg"])
        out, have, i = [], np.asarray(context), 0

        def add(new) -> None:
            nonlocal have
            out.append(np.asarray(new))
            have = np.concatenate([have, out[-1]], axis=1)

        remaining = lambda: num_new - sum(x.shape[1] for x in out)  # noqa: E731
        while remaining() > 0 and (have.shape[1] == 0 or have.shape[1] < self.lm_context):
            if have.shape[1] == 0:
                add(sample(self.lm, self.lm_params, prefix, min(remaining(), self.lm_window), fold(keys, i),
                           **sampling))
            else:
                add(continue_tokens(self.lm, self.lm_params, prefix, self._context(have),
                                    min(remaining(), self.chunk_tokens), fold(keys, i), **sampling))
            i += 1
        whole = remaining() // self.chunk_tokens
        if whole:
            add(continue_windows(self.lm, self.lm_params, prefix, self._context(have), keys, whole, self.chunk_tokens,
                                 first_window=i, **sampling))
            i += whole
        if remaining() > 0:
            add(continue_tokens(self.lm, self.lm_params, prefix, self._context(have), remaining(), fold(keys, i),
                                **sampling))
        return jnp.asarray(np.concatenate(out, axis=1) if out else np.zeros((len(context), 0), np.int32))

    def _latents(self, z0, tokens: np.ndarray, keys, s: dict[str, Any]) -> jax.Array:
        """Latents for all `tokens`; the frames of z0 (for the first tokens) come back unchanged."""
        cfg, steps, schedule = s["cfg"], s["steps"], s["schedule"]
        fpt, window, chunk = self.frames_per_token, self.window_tokens, self.chunk_tokens
        n = tokens.shape[1]
        known = 0 if z0 is None else z0.shape[1] // fpt
        first = min(n, max(window, known))
        if known == 0:
            z = sample_latents(self.dpd, self.dpd_params, jnp.asarray(tokens[:, :first]), fold(keys, 0), cfg,
                               length=first * fpt, num_steps=steps, schedule=schedule)
        elif known < first:
            z = jnp.pad(jnp.asarray(z0)[:, : known * fpt], ((0, 0), (0, (first - known) * fpt), (0, 0)))
            mask = jnp.broadcast_to(jnp.arange(first * fpt) >= known * fpt, z.shape[:2])
            z = inpaint_sampled_latents(self.dpd, self.dpd_params, z, mask, jnp.asarray(tokens[:, :first]),
                                        fold(keys, 0), cfg, num_steps=steps, schedule=schedule)
        else:
            z = jnp.asarray(z0)[:, : known * fpt]
        if n > first:
            ends = range(first + chunk, n + 1, chunk)
            conds = jnp.stack([jnp.asarray(tokens[:, e - window:e]) for e in ends])
            z = continue_sampled_latents(self.dpd, self.dpd_params, z, conds, fold(keys, 1), cfg,
                                         window_length=window * fpt, chunk_length=chunk * fpt, num_steps=steps,
                                         schedule=schedule)
        return z

    def _prefix(self, prompts: Sequence[str] | None, audio: np.ndarray):
        if prompts is None:
            return lambda: self.mulan.audio_tokens(audio)
        prompts = [check_prompt(p, MAX_PROMPT_CHARS) for p in prompts]
        if len(prompts) != len(audio):
            raise AudioInputError(f"got {len(prompts)} prompts for {len(audio)} audio clips")
        return lambda: self.mulan.text_tokens(prompts)

    def _check_audio(self, audio: np.ndarray, min_seconds: float) -> np.ndarray:
        audio = np.asarray(audio, np.float32)
        if audio.ndim == 1:
            audio = audio[None]
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise AudioInputError(f"audio must be [samples] or [batch, samples], got shape {audio.shape}")
        if not np.isfinite(audio).all():
            raise AudioInputError("audio holds NaN or infinite samples")
        if audio.shape[1] < max(min_seconds * self.sample_rate, self.tokenizer.hop):
            raise AudioInputError(f"audio of {audio.shape[1] / self.sample_rate:.3f} s is shorter than one "
                                  f"semantic token ({self.tokenizer.hop / self.sample_rate:.3f} s)")
        return audio

    @staticmethod
    def _timed(seconds: dict[str, float], name: str, fn) -> Any:
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return out
