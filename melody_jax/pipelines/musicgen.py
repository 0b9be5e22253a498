"""The MusicGen path end to end (DESIGN §6): text (+ melody, + audio prompt) → codebook LM → codec decoder.

Loads a MusicGen bundle once: one trained here (`launch.bundle --model=musicgen`) or converted from
a public checkpoint (`launch.convert`, which adds the T5 tokenizer and the hub's sampling defaults).
The verbs are audiocraft's — `generate`, `generate_unconditional`, `generate_continuation`,
`generate_with_chroma` — each sampling codes with the jit-compiled KV-cache loop of
`musicgen_sampling` (CFG, top-k or top-p, sliding windows beyond the trained length) and decoding
them with the frozen codec, returning the same `Result` as MeLoDy so the two systems can be run and
timed side by side (`pipelines.generation.Generator`). Unset arguments take the bundle's `sample`
defaults (duration, top_k, top_p, temperature, cfg_scale — the argument `cfg` —, cfg_beta, two_step_cfg).
A stereo checkpoint's codes are [L0, R0, L1, R1, …]: each channel decodes with the mono codec, and the
audio is `[B, T, 2]`.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence

import jax
import numpy as np

from melody_jax.audio.chroma import NUM_CHROMA
from melody_jax.models import codec
from melody_jax.frozen.codec import FrozenCodec, audio_channels, check_musicgen_fit
from melody_jax.frozen.loader import load_stage
from melody_jax.frozen.stage_models import musicgen_pattern
from melody_jax.pipelines.bundle import read_configs
from melody_jax.pipelines.generation import AudioInputError, Generator, Result
from melody_jax.pipelines.musicgen_sampling import generate
from melody_jax.pipelines.validation import MAX_PROMPT_CHARS, MAX_SECONDS, check_duration, check_prompt
from melody_jax.tasks.musicgen import melody_condition
from melody_jax.text.byte_tokenizer import tokenize as byte_tokenize
from melody_jax.training.sharding import DEFAULT_RULES, activate, make_mesh

SAMPLE_DEFAULTS = {"duration": 10.0, "top_k": 250, "top_p": 0.0, "temperature": 1.0, "cfg_scale": 3.0,
                   "cfg_beta": None, "two_step_cfg": False}
HUB_CHROMA = {"n_fft": 16384, "hop": 4096}
TEXT_BUCKET = 32  # T5 tokens  # musicgen-melody's feature extractor, at the codec's rate


def hub_chroma(audio: np.ndarray, sample_rate: int, n_fft: int = HUB_CHROMA["n_fft"],
               hop: int = HUB_CHROMA["hop"]) -> np.ndarray:
    """float32 one-hot `[1 + T // hop, 12]`: musicgen-melody's chroma (transformers' feature extractor).

    Power spectrogram (Hann, centred, reflect-padded; audio shorter than n_fft zero-padded to it
    evenly), librosa's chroma filters at tuning 0, argmax per frame — the max-normalisation before
    the argmax does not change it.
    """
    import librosa

    audio = np.asarray(audio, np.float32)
    if len(audio) < n_fft:
        pad = n_fft - len(audio)
        audio = np.pad(audio, (pad // 2, pad - pad // 2))
    spec = np.abs(librosa.stft(audio, n_fft=n_fft, hop_length=hop, window="hann", center=True,
                               pad_mode="reflect")) ** 2
    chroma = librosa.filters.chroma(sr=sample_rate, n_fft=n_fft, tuning=0.0, n_chroma=NUM_CHROMA) @ spec
    return np.eye(NUM_CHROMA, dtype=np.float32)[chroma.argmax(axis=0)]


class MusicGen(Generator):
    """A loaded MusicGen bundle on `mesh` (default one device)."""

    name = "musicgen"

    def __init__(self, bundle: str, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES):
        configs = read_configs(bundle)
        check_musicgen_fit(configs)
        self.mesh, self.rules = mesh or make_mesh({"data": 1}, jax.devices()[:1]), rules
        with activate(self.mesh, rules):
            frozen_codec = FrozenCodec.load(os.path.join(bundle, "codec"), self.mesh, rules)
            lm = load_stage(os.path.join(bundle, "musicgen"), "musicgen", self.mesh, rules, field="musicgen")
        self.codec, self._codec_variables = frozen_codec.model, frozen_codec.variables
        self.config, self.model, self.lm_params = lm.config, lm.model, lm.params
        self.pattern = musicgen_pattern(self.config.model)
        self.channels = audio_channels(self.config)
        self.sample_rate = frozen_codec.sample_rate
        self.frame_rate = self.sample_rate / self.codec.hop
        self.prepend = self.model.prepend
        # codec frames per chroma row: hub_chroma's hop for musicgen-melody (6.4 at 32 kHz), else the config's
        self.chroma_hop_frames = (HUB_CHROMA["hop"] / self.codec.hop if self.prepend
                                  else self.config.model.chroma_hop_frames)
        self.tokenizer = None
        if self.model.text_encoder == "t5":
            from melody_jax.text.t5_tokenizer import T5Tokenizer

            self.tokenizer = T5Tokenizer(os.path.join(bundle, "musicgen", "tokenizer.json"))
        stored = {k: self.config.sample.get(k, v) for k, v in SAMPLE_DEFAULTS.items()}
        self.defaults = {"cfg": stored.pop("cfg_scale"), **stored}
        self._decode = jax.jit(lambda variables, codes: codec.decode(variables, codes, self.codec))  # weights: args
        self._encode = jax.jit(lambda variables, audio: codec.encode(variables, audio, self.codec))

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and mask. T5 pads to a multiple of TEXT_BUCKET (one compiled sampler for many prompt
        lengths), which changes nothing where padding is masked (cross-attention); musicgen-melody
        attends its padded text, so it pads to the longest prompt exactly as transformers does."""
        if self.tokenizer is not None:
            return self.tokenizer(prompts, self.config.model.max_text_length, 1 if self.prepend else TEXT_BUCKET)
        return byte_tokenize(list(prompts), self.config.model.max_text_length)

    def melody_chroma(self, melody: np.ndarray, num_frames: int) -> np.ndarray:
        """[T] audio → chroma: musicgen-melody's (`hub_chroma`), else one row per `chroma_hop_frames`
        codec frames (as in training)."""
        m = self.config.model
        if len(melody) < self.codec.hop:
            raise AudioInputError(f"the melody is {len(melody)} samples; give at least one codec frame")
        if self.prepend:
            return hub_chroma(melody, self.sample_rate)
        return melody_condition(np.asarray(melody, np.float32), self.sample_rate, self.codec.hop, m,
                                math.ceil(num_frames / m.chroma_hop_frames),
                                self.config.data.get("melody_separation", "none"))

    def _chroma(self, melody, batch: int, num_frames: int) -> np.ndarray | None:
        if not self.config.model.use_melody:
            if melody is not None:
                raise AudioInputError("this MusicGen has no melody conditioning; leave out the melody")
            return None
        if melody is None:
            if self.prepend:  # the null melody (bin 0, transformers' default input features)
                return np.broadcast_to(np.eye(NUM_CHROMA, dtype=np.float32)[:1], (batch, 1, NUM_CHROMA))
            rows = math.ceil(num_frames / self.config.model.chroma_hop_frames)
            return np.zeros((batch, rows, NUM_CHROMA), np.float32)
        if isinstance(melody, np.ndarray) and melody.ndim == 1:
            rows = self.melody_chroma(melody, num_frames)
            return np.broadcast_to(rows[None], (batch,) + rows.shape)
        if len(melody) != batch:
            raise AudioInputError(f"{len(melody)} melodies for {batch} prompts; give one per prompt")
        rows = [self.melody_chroma(np.asarray(x), num_frames) for x in melody]
        length = min(len(r) for r in rows)
        return np.stack([r[:length] for r in rows])

    def _run(self, prompts: Sequence[str] | None, batch: int, seed: int, s: dict, melody=None,
             prompt_codes: np.ndarray | None = None) -> Result:
        duration_s = check_duration(s["duration"], MAX_SECONDS)
        if s["cfg_beta"] is not None and not self.config.model.use_melody:
            raise AudioInputError("cfg_beta guides text against the melody; this MusicGen has no melody conditioning")
        unconditional = prompts is None
        prompts = [""] * batch if unconditional else [check_prompt(p, MAX_PROMPT_CHARS) for p in prompts]
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[2]
        num_frames = prompt_frames + math.ceil(duration_s * self.frame_rate - 1e-9)
        chroma = self._chroma(melody, len(prompts), num_frames)
        seconds: dict[str, float] = {}
        with activate(self.mesh, self.rules):
            start = time.perf_counter()
            tokens, mask = self.tokenize(prompts)
            out = generate(self.model, self.lm_params, self.pattern, tokens, mask, num_frames, jax.random.key(seed),
                           chroma=chroma, prompt=prompt_codes, cfg_scale=s["cfg"], top_k=s["top_k"],
                           top_p=s["top_p"], temperature=s["temperature"],
                           window_frames=self.config.sample.window_frames,
                           keep_frames=self.config.sample.keep_frames, chroma_hop_frames=self.chroma_hop_frames,
                           melody_frames=None if self.prepend else self.config.model.melody_frames,
                           unconditional=unconditional, cfg_beta=s["cfg_beta"], two_step_cfg=s["two_step_cfg"])
            codes = jax.block_until_ready(out.codes)
            seconds["musicgen_lm"] = time.perf_counter() - start
            start = time.perf_counter()
            audio = self.decode(codes)
            audio = audio[:, : prompt_frames * self.codec.hop + int(round(duration_s * self.sample_rate))]
            seconds["codec_decode"] = time.perf_counter() - start
        return Result(audio, self.sample_rate, seconds, {"musicgen_lm": out.forward_passes, "codec_decode": 1},
                      codes=np.asarray(codes))

    def decode(self, codes: jax.Array) -> np.ndarray:
        """Codes `[B, K, T]` → audio `[B, T·hop]` (stereo: `[B, T·hop, 2]`, channel c from codebooks c::2)."""
        if self.channels == 1:
            return np.asarray(self._decode(self._codec_variables, codes))
        return np.stack([np.asarray(self._decode(self._codec_variables, codes[:, c :: self.channels]))
                         for c in range(self.channels)], axis=-1)

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """Audio `[B, T]` (stereo `[B, T, 2]`; mono is copied to both) → codes `int32 [B, K, ceil(T / hop)]`."""
        audio = np.asarray(audio, np.float32)
        with activate(self.mesh, self.rules):
            if self.channels == 1:
                return np.asarray(self._encode(self._codec_variables, audio.mean(-1) if audio.ndim == 3 else audio))
            sides = audio if audio.ndim == 3 else np.stack([audio] * self.channels, axis=-1)
            codes = [np.asarray(self._encode(self._codec_variables, sides[..., c])) for c in range(self.channels)]
        return np.stack(codes, axis=2).reshape(codes[0].shape[0], -1, codes[0].shape[2])  # [L0, R0, L1, R1, …]

    def generate(self, prompts: Sequence[str], duration_s: float | None = None, seed: int = 0,
                 melody: np.ndarray | Sequence[np.ndarray] | None = None, **sampling) -> Result:
        """Audio `[B, duration_s · sample_rate]` for text prompts (+ a melody to follow, any length:
        one waveform for every prompt, or a sequence of one per prompt)."""
        return self._run(prompts, len(prompts), seed, self.settings(duration_s, **sampling), melody)

    def generate_unconditional(self, num_samples: int, duration_s: float | None = None, seed: int = 0,
                               **sampling) -> Result:
        """Audio from the null condition (no text, no melody; no guidance, as transformers' unconditional inputs)."""
        if num_samples < 1:
            raise AudioInputError(f"num_samples must be >= 1, got {num_samples}")
        return self._run(None, num_samples, seed, self.settings(duration_s, **sampling))

    def generate_with_chroma(self, prompts: Sequence[str], melody: np.ndarray | Sequence[np.ndarray],
                             duration_s: float | None = None, seed: int = 0, **sampling) -> Result:
        """`generate` following a melody's chromagram (a melody model only)."""
        if not self.config.model.use_melody:
            raise AudioInputError("this MusicGen has no melody conditioning; use generate")
        return self._run(prompts, len(prompts), seed, self.settings(duration_s, **sampling), melody)

    def generate_continuation(self, audio: np.ndarray, duration_s: float | None = None,
                              prompts: Sequence[str] | None = None, seed: int = 0, **sampling) -> Result:
        """The audio prompt (`[T]` or `[B, T]`, stereo `[..., 2]`, at the codec's rate) encoded to codes and
        continued by `duration_s`; the result starts with the prompt's decoded frames. Without text
        prompts the continuation is unconditional."""
        s = self.settings(duration_s, **sampling)
        audio = np.asarray(audio, np.float32)
        audio = audio[None] if audio.ndim == 1 or (audio.ndim == 2 and audio.shape[-1] == self.channels > 1) else audio
        if audio.shape[1] < self.codec.hop:
            raise AudioInputError(f"the audio prompt is {audio.shape[1]} samples; give at least one codec frame")
        batch = audio.shape[0] if prompts is None else len(prompts)
        if audio.shape[0] not in (1, batch):
            raise AudioInputError(f"{audio.shape[0]} audio prompts for {batch} text prompts")
        codes = self.encode(np.broadcast_to(audio, (batch,) + audio.shape[1:]))
        window = self.config.sample.window_frames
        if codes.shape[2] >= window:
            raise AudioInputError(f"the audio prompt is {codes.shape[2] / self.frame_rate:.2f} s; give less than "
                                  f"{window / self.frame_rate:.2f} s (the model's window)")
        return self._run(prompts, batch, seed, s, prompt_codes=codes)
