"""MusicGen stage (DESIGN §6, §7): next-step loss over pattern-interleaved codec codes, with CFG dropout.

Batches: `codes int32 [B, K, T]`, `text_tokens int32 [B, L]`, `text_mask bool [B, L]` and, with
melody conditioning, `chroma float32 [B, F, 12]` (one row per `model.chroma_hop_frames` codec frames).
The loss is the cross-entropy of every real code of the pattern sequence (special slots excluded); codec
frames that are padding (the crop's `mask`, or an optional `frame_mask [B, T]` beside `codes`) become
special slots before the pattern is built, so a short clip padded to the crop trains exactly as the
clip cut to its length (a causal LM, and the pattern places a frame's codes at steps ≥ the frame's);
in training the conditions are dropped (`train.cfg_dropout*`, see melody_jax/tasks/musicgen_conditions.py:
all together, then each alone), so the model also learns the null conditions that guided sampling
subtracts; an empty text trains as the null text. The texts may be augmented on the host first
(`train.word_dropout`, `train.merge_text_p`: audiocraft's word dropout and description merging).

Data sources (`config.data.source`, melody_jax/tasks/sources.py):
- "synthetic": a rule a tiny model learns in a few hundred steps, with both conditions mattering.
  Each example has an instrument i (from its caption, e.g. "violin solo") and a melody: random notes
  (pitch class b ∈ [0, 12), 1..`data.max_note_frames` chroma frames each) whose chromagram is the
  one-hot of b plus noise. Codebook 0 at frame t is b_t + 12·i; codebook k is (code_0 + 16·k) mod V.
  So code_0 mod 12 — the "chroma" of the codes — follows the given melody, which a model can only
  know from the melody prefix at each note change: the synthetic stand-in for "the chroma of the
  generated audio follows the given chroma". Batches are a pure function of (split's stream seed,
  batch index).
- "codec": crops of `data.frames` codec frames from a prepared dataset at the codec's rate
  (`data.path`), with their captions (or tag lists, see `data.caption_probability`) and, with
  melody conditioning, their librosa chromagram made on the host at data time (`model.chroma_n_fft`,
  after `data.melody_separation`; from the crop itself or, `data.melody_segment="other"`, from another
  part of its clip). The frozen codec
  (`upstream.codec`: the codec stage's workdir or a bundle's codec folder, loaded by `setup`) turns
  the crops into codes inside the jitted step; its parameters ride along with every batch
  (`frozen.inputs.FrozenInputs`).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipeline.indexed import IndexedBatches
from melody_jax.audio.chroma import NUM_CHROMA, SEPARATIONS, melody_rows
from melody_jax.audio.padding import frame_mask
from melody_jax.models.musicgen_lm import MELODY_MODES, NORMS, POSITIONS, TEXT_ENCODERS, MusicGenLM
from melody_jax.tasks.musicgen_conditions import DROPOUT_SCOPES, augment_texts, condition_dropout, empty_text
from melody_jax.frozen.checks import require_upstream
from melody_jax.frozen.codec import FrozenCodec, check_musicgen_fit
from melody_jax.frozen.inputs import FrozenInputs
from melody_jax.frozen.stage_models import (ARCHITECTURE, PATTERN_OPTIONS, build_model, musicgen_example_inputs,
                                            musicgen_pattern)
from melody_jax.models.codebook_patterns import PATTERNS, Pattern
from melody_jax.tasks.sources import TRAIN, SourcedTask, prepared_audio, stream_seed
from melody_jax.text.byte_tokenizer import tokenize
from melody_jax.training.config import non_negative, one_of, positive, require
from melody_jax.training.errors import BundleError, ConfigError
from melody_jax.training.sharding import config_rules
from melody_jax.training.task import Batch

INSTRUMENTS = ("piano", "violin", "flute", "drums")
MELODY_SEGMENTS = ("same", "other")  # the melody chroma's crop: the target's, or another part of its clip
TEMPLATES = ("{} solo", "a calm melody played on the {}", "upbeat {} music")
FINE_STEP = 16  # codebook k holds (code_0 + FINE_STEP · k) mod V
TEXT_STREAM = 7  # the text augmentation's random stream, apart from the data's


def synthetic_examples(seed: int, index: int, batch: int, *, frames: int, num_codebooks: int, codebook_size: int,
                       chroma_hop: int, melody_frames: int, max_note_frames: int) -> dict[str, Any]:
    """The rule of the module docstring: codes, chroma, texts, and the instrument and per-frame bin behind them."""
    rng = np.random.default_rng([seed, index])
    instrument = rng.integers(0, len(INSTRUMENTS), batch)
    lengths = rng.integers(1, max_note_frames + 1, (batch, melody_frames))
    pitches = rng.integers(0, NUM_CHROMA, (batch, melody_frames))
    notes = np.stack([np.repeat(p, n)[:melody_frames] for p, n in zip(pitches, lengths)])  # [B, F] chroma frames
    chroma = (np.eye(NUM_CHROMA, dtype=np.float32)[notes]
              + rng.uniform(0.0, 0.5, (batch, melody_frames, NUM_CHROMA)).astype(np.float32))
    bins = notes[:, np.arange(frames) // chroma_hop]  # [B, T]: the melody at each codec frame
    code0 = bins + NUM_CHROMA * instrument[:, None]
    codes = (code0[:, None, :] + FINE_STEP * np.arange(num_codebooks)[None, :, None]) % codebook_size
    template = rng.integers(0, len(TEMPLATES), batch)
    texts = [TEMPLATES[t].format(INSTRUMENTS[i]) for t, i in zip(template, instrument)]
    return {"codes": codes.astype(np.int32), "chroma": chroma / chroma.max(-1, keepdims=True), "texts": texts,
            "instrument": instrument, "bins": bins}


def rule_agreement(codes: np.ndarray, instrument: np.ndarray, bins: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Shares of codes [B, K, T] following each part of the rule, and of samples following all of it."""
    codes = np.asarray(codes)
    code0 = codes[:, 0]
    text = code0 // NUM_CHROMA == instrument[:, None]
    melody = code0 % NUM_CHROMA == bins
    expected = (code0[:, None] + FINE_STEP * np.arange(codes.shape[1])[None, :, None]) % codebook_size
    fine = (codes == expected)[:, 1:].all(1)
    whole = text & melody & fine
    return {"text": float(text.mean()), "melody": float(melody.mean()), "fine": float(fine.mean()),
            "samples": float(whole.all(1).mean())}


def synthetic_batches(config, mesh, seed: int, train: bool = True) -> IndexedBatches:
    """Endless global batches of the synthetic rule; the position is the batch index. Training texts
    go through the text augmentation."""
    c = config

    def make(index: int) -> dict[str, np.ndarray]:
        ex = synthetic_examples(seed, index, c.train.batch_size, frames=c.data.frames,
                                num_codebooks=c.model.num_codebooks, codebook_size=c.model.codebook_size,
                                chroma_hop=c.model.chroma_hop_frames, melody_frames=c.model.melody_frames,
                                max_note_frames=c.data.max_note_frames)
        texts = ex["texts"]
        if train:
            texts = augment_texts(texts, None, None, np.random.default_rng([seed, index, TEXT_STREAM]), c.train)
        tokens, mask = tokenize(texts, c.model.max_text_length)
        batch = {"codes": ex["codes"], "text_tokens": tokens, "text_mask": mask}
        if c.model.use_melody:
            batch["chroma"] = ex["chroma"]
        return batch

    return IndexedBatches(make, c.train.batch_size, mesh)


def melody_condition(audio: np.ndarray, sample_rate: int, codec_hop: int, model_config, rows: int,
                     separation: str = "none") -> np.ndarray:
    """The melody chroma `[..., rows, 12]` the LM of `model_config` trains on: one row per
    `chroma_hop_frames` codec frames, with its `chroma_n_fft` (4096 for configs predating it)."""
    m = model_config
    return melody_rows(audio, sample_rate, codec_hop * m.chroma_hop_frames, rows, n_fft=m.get("chroma_n_fft", 4096),
                       separation=separation)


class MusicGenTask(SourcedTask):
    name = "musicgen"
    sources = ("synthetic", "codec")

    def validate(self) -> None:
        c = self.config
        m, d = c.model, c.data
        self.check_data()
        one_of(c, "model.pattern", tuple(sorted(PATTERNS)))
        one_of(c, "model.dtype", ("float32", "bfloat16"))
        positive(c, "model.num_codebooks", "model.codebook_size", "model.num_layers", "model.embed_dim",
                 "model.num_heads", "model.mlp_dim", "model.text_layers", "model.text_embed_dim", "model.text_heads",
                 "model.text_mlp_dim", "model.max_text_length", "model.chroma_hop_frames", "model.melody_frames",
                 "data.frames", "sample.window_frames")
        non_negative(c, "sample.top_k", "sample.temperature", "sample.cfg_scale")
        options = {k: m.get(k, default) for k, default in ARCHITECTURE.items()}
        for field, choices in (("norm", NORMS), ("positions", POSITIONS), ("text_encoder", TEXT_ENCODERS),
                               ("melody_mode", MELODY_MODES)):
            require(options[field] in choices, f"config.model.{field}={options[field]!r} must be one of {choices}")
        rotary = [("embed_dim", "num_heads")] if options["positions"] == "rotary" else []
        if options["text_encoder"] == "bytes":  # MuLan's text tower is rotary too
            rotary.append(("text_embed_dim", "text_heads"))
        require(m.embed_dim % m.num_heads == 0,
                f"config.model.num_heads={m.num_heads} must divide embed_dim={m.embed_dim}")
        for width, heads in rotary:
            require(m[width] % m[heads] == 0 and (m[width] // m[heads]) % 2 == 0,
                    f"config.model.{width}={m[width]} / {heads}={m[heads]} must be an even integer (rotary)")
        if options["text_encoder"] == "t5":
            positive(c, "model.text_vocab_size", "model.text_head_dim")
        prefix = m.use_melody and options["melody_mode"] == "prefix"
        require(not prefix or m.melody_frames * m.chroma_hop_frames >= d.frames,
                f"config.model.melody_frames={m.melody_frames} × chroma_hop_frames={m.chroma_hop_frames} "
                f"must cover data.frames={d.frames}")
        for field in ("cfg_dropout", "cfg_dropout_text", "cfg_dropout_melody", "word_dropout"):
            require(0.0 <= c.train[field] < 1.0, f"config.train.{field}={c.train[field]} must lie in [0, 1)")
        for field in ("merge_text_p", "drop_desc_p", "drop_other_p"):
            require(0.0 <= c.train[field] <= 1.0, f"config.train.{field}={c.train[field]} must lie in [0, 1]")
        one_of(c, "train.cfg_dropout_per", DROPOUT_SCOPES)
        one_of(c, "data.melody_separation", SEPARATIONS)
        segment = d.get("melody_segment", "same")
        require(segment in MELODY_SEGMENTS, f"config.data.melody_segment={segment!r} must be one of {MELODY_SEGMENTS}")
        positive(c, "model.chroma_n_fft")
        beta = c.sample.get("cfg_beta")
        require(beta is None or (isinstance(beta, (int, float)) and math.isfinite(beta) and m.use_melody),
                f"config.sample.cfg_beta={beta} must be None (plain CFG) or a finite number with model.use_melody")
        require(0 <= c.sample.keep_frames < c.sample.window_frames <= d.frames,
                f"config.sample: need 0 <= keep_frames ({c.sample.keep_frames}) < window_frames "
                f"({c.sample.window_frames}) <= data.frames ({d.frames})")
        try:
            musicgen_pattern(m)
        except ValueError as e:
            require(False, f"config.model.pattern/{'/'.join(('delays',) + PATTERN_OPTIONS)}: {e}")
        if d.source == "synthetic":
            need = NUM_CHROMA * len(INSTRUMENTS)
            require(m.codebook_size >= need,
                    f"config.model.codebook_size={m.codebook_size} must be >= {need} for the synthetic rule")
            positive(c, "data.max_note_frames")
        else:
            require_upstream(c, "codec")
            require(0.0 <= d.caption_probability <= 1.0,
                    f"config.data.caption_probability={d.caption_probability} must lie in [0, 1]")

    @property
    def model(self) -> MusicGenLM:
        return build_model(self.config).module

    @property
    def pattern(self) -> Pattern:
        return musicgen_pattern(self.config.model)

    def example_inputs(self, batch: int = 1) -> tuple[jax.Array, ...]:
        """Zero inputs of the training shapes: (seq, text_tokens, text_mask, chroma or None)."""
        return musicgen_example_inputs(self.config, batch)

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    codec: FrozenCodec | None = None  # data.source="codec": the frozen codec of `upstream.codec`, set by `setup`

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        """data.source="codec": the codec of `upstream.codec` on `mesh`, checked against this LM."""
        if self.config.data.source != "codec" or self.codec is not None:
            return
        codec = FrozenCodec.load(self.config.upstream.codec, mesh, config_rules(self.config),
                                 field="config.upstream.codec")
        try:
            check_musicgen_fit({"codec": codec.config, "musicgen": self.config})
        except BundleError as e:
            raise ConfigError(f"config.upstream.codec: {e}") from None
        self.codec = codec

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        model, c = self.model, self.config
        if "frozen" in batch:  # data.source="codec": the crops' codes, from the frozen codec
            codes = self.codec.encode_fn(batch["frozen"], batch["audio"])[:, :, : c.data.frames]
            valid_frames = frame_mask(batch["mask"], self.codec.hop, codes.shape[2])
        else:
            codes = batch["codes"]
            valid_frames = batch.get("frame_mask")
        if valid_frames is not None:  # padding frames become empty slots: neither inputs nor CE targets
            codes = jnp.where(valid_frames[:, None, :] > 0, codes, model.special_token)
        seq = self.pattern.build(codes, model.special_token)
        drop_text = drop_melody = None
        if train:
            t = c.train
            drop_text, drop_melody = condition_dropout(
                rng, seq.shape[0], joint=t.cfg_dropout, text=t.cfg_dropout_text, melody=t.cfg_dropout_melody,
                per=t.cfg_dropout_per)
            drop_text = drop_text | empty_text(batch["text_mask"])
        logits = model.apply({"params": params}, seq, batch["text_tokens"], batch["text_mask"], batch.get("chroma"),
                             drop_text, drop_melody)
        valid = seq != model.special_token
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, seq, 0))
        weight = valid.astype(jnp.float32)
        total = jnp.maximum(weight.sum(), 1.0)
        loss = (ce * weight).sum() / total
        correct = (logits.argmax(-1) == seq) * weight
        per_codebook = (ce * weight).sum((0, 2)) / jnp.maximum(weight.sum((0, 2)), 1.0)
        metrics = {"accuracy": correct.sum() / total}
        metrics.update({f"ce_codebook_{k}": per_codebook[k] for k in range(per_codebook.shape[0])})
        return loss, metrics

    def _codec_batches(self, mesh, split: str) -> FrozenInputs:
        from melody_jax.tasks.mulan import TextAudioIterator

        c, m = self.config, self.config.model
        hop, seed = self.codec.hop, stream_seed(self.config.seed, split)
        data = c.data.copy_and_resolve_references()
        data.crop_seconds = c.data.frames * hop / c.data.sample_rate
        other = m.use_melody and c.data.get("melody_segment", "same") == "other"
        audio = prepared_audio(c, mesh, split, with_text=True, data=data, other_segment=other)

        def chroma(rows: np.ndarray) -> dict[str, np.ndarray]:
            return {"chroma": melody_condition(rows, c.data.sample_rate, hop, m, m.melody_frames,
                                               c.data.melody_separation)}

        def augment(texts, captions, tags, rng):
            return augment_texts(texts, captions, tags, rng, c.train) if split == TRAIN else texts

        texts = TextAudioIterator(audio, mesh, seed=seed, global_batch_size=c.train.batch_size,
                                  caption_probability=c.data.caption_probability,
                                  max_text_length=m.max_text_length,
                                  features=chroma if m.use_melody else None, augment=augment,
                                  feature_audio="other_audio" if other else "audio")
        return FrozenInputs(texts, self.codec.variables)

    def batches(self, mesh, split: str):
        if self.config.data.source == "codec":
            return self._codec_batches(mesh, split)
        return synthetic_batches(self.config, mesh, stream_seed(self.config.seed, split), train=split == TRAIN)

    def describe(self, params: Any) -> dict[str, int]:
        out = super().describe(params)
        layers = {k: v for k, v in out.items() if k.startswith("layers_")}
        return {"layers": sum(layers.values()), **{k: v for k, v in out.items() if k not in layers}}
