"""The MusicGen path end to end (DESIGN §6): text (+ melody) → codebook LM → codec decoder.

Loads a MusicGen bundle (`launch.bundle --model=musicgen`) once. `generate` samples codes with the
jit-compiled KV-cache loop of `musicgen_sampling` (CFG, top-k, sliding windows beyond the trained
length) and decodes them with the frozen codec, returning the same `Result` as MeLoDy so the two
systems can be run and timed side by side on the same prompts and durations.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from melody_jax.audio.chroma import melody_rows
from melody_jax.models import codec
from melody_jax.pipelines.bundle import KEEP, check_musicgen_fit, read_configs
from melody_jax.pipelines.melody import MAX_PROMPT_CHARS, MAX_SECONDS, AudioInputError, Result
from melody_jax.pipelines.musicgen_sampling import generate
from melody_jax.pipelines.validation import check_duration, check_prompt
from melody_jax.tasks.musicgen import musicgen_model, musicgen_pattern
from melody_jax.tokenizers.text import tokenize as text_tokenize
from melody_jax.training.frozen import load_stage
from melody_jax.training.sharding import DEFAULT_RULES, activate, make_mesh

class MusicGen:
    """A loaded MusicGen bundle on `mesh` (default one device)."""

    def __init__(self, bundle: str, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES):
        configs = read_configs(bundle)
        check_musicgen_fit(configs)
        self.mesh, self.rules = mesh or make_mesh({"data": 1}, jax.devices()[:1]), rules
        with activate(self.mesh, rules):
            codec_task, self.codec_params, _ = load_stage(os.path.join(bundle, "codec"), "codec", self.mesh, rules,
                                                          keep=KEEP["codec"])
            lm_task, self.lm_params, _ = load_stage(os.path.join(bundle, "musicgen"), "musicgen", self.mesh, rules)
        self.codec, self.config = codec_task.model, lm_task.config
        self.model, self.pattern = musicgen_model(self.config.model), musicgen_pattern(self.config.model)
        self.sample_rate = codec_task.config.data.sample_rate
        self.frame_rate = self.sample_rate / self.codec.hop
        self._codec_variables = {"params": self.codec_params["generator"], **self.codec_params["generator_state"]}
        self._decode = jax.jit(lambda variables, codes: codec.decode(variables, codes, self.codec))  # weights: args

    def melody_chroma(self, melody: np.ndarray, num_frames: int) -> np.ndarray:
        """[T] audio → chroma [Fc, 12], one row per `chroma_hop_frames` codec frames (as in training)."""
        m = self.config.model
        if len(melody) < self.codec.hop:
            raise AudioInputError(f"the melody is {len(melody)} samples; give at least one codec frame")
        return melody_rows(np.asarray(melody, np.float32), self.sample_rate, self.codec.hop * m.chroma_hop_frames,
                           math.ceil(num_frames / m.chroma_hop_frames))

    def generate(self, prompts: Sequence[str], duration_s: float, cfg: float | None = None, top_k: int | None = None,
                 temperature: float | None = None, seed: int = 0,
                 melody: np.ndarray | Sequence[np.ndarray] | None = None) -> Result:
        """Audio `[B, duration_s · sample_rate]` for text prompts (+ a melody to follow, any length:
        one waveform for every prompt, or a sequence of one per prompt)."""
        duration_s = check_duration(duration_s, MAX_SECONDS)
        prompts = [check_prompt(p, MAX_PROMPT_CHARS) for p in prompts]
        s = self.config.sample
        cfg, top_k = s.cfg_scale if cfg is None else cfg, s.top_k if top_k is None else top_k
        temperature = s.temperature if temperature is None else temperature
        num_frames = math.ceil(duration_s * self.frame_rate - 1e-9)
        chroma = None
        if self.config.model.use_melody:
            rows = math.ceil(num_frames / self.config.model.chroma_hop_frames)
            if melody is None:
                chroma = np.zeros((len(prompts), rows, 12), np.float32)
            elif isinstance(melody, np.ndarray) and melody.ndim == 1:
                chroma = np.broadcast_to(self.melody_chroma(melody, num_frames), (len(prompts), rows, 12))
            else:
                if len(melody) != len(prompts):
                    raise AudioInputError(f"{len(melody)} melodies for {len(prompts)} prompts; give one per prompt")
                chroma = np.stack([self.melody_chroma(np.asarray(x), num_frames) for x in melody])
        seconds: dict[str, float] = {}
        with activate(self.mesh, self.rules):
            start = time.perf_counter()
            tokens, mask = text_tokenize(list(prompts), self.config.model.max_text_length)
            out = generate(self.model, self.lm_params, self.pattern, tokens, mask, num_frames, jax.random.key(seed),
                           chroma=chroma, cfg_scale=cfg, top_k=top_k, temperature=temperature,
                           window_frames=s.window_frames, keep_frames=s.keep_frames,
                           chroma_hop_frames=self.config.model.chroma_hop_frames,
                           melody_frames=self.config.model.melody_frames)
            codes = jax.block_until_ready(out.codes)
            seconds["musicgen_lm"] = time.perf_counter() - start
            start = time.perf_counter()
            audio = np.asarray(self._decode(self._codec_variables, codes))
            audio = audio[:, : int(round(duration_s * self.sample_rate))]
            seconds["codec_decode"] = time.perf_counter() - start
        return Result(audio, self.sample_rate, seconds, {"musicgen_lm": out.forward_passes, "codec_decode": 1},
                      codes=np.asarray(codes))
