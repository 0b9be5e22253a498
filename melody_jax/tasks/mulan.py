"""MuLan stage (DESIGN §4.3, §7): contrastive audio–text training on a prepared captioned dataset.

The data pipeline's crops arrive with this host's captions and tag lists as strings; the iterator
pairs each crop with its caption or its tag list at random (a pure function of seed, batch index
and row, so resume and multi-host runs agree), tokenises on the host and hands the loop global
arrays only: `audio [B, crop]`, `text_tokens int32 [B, L]`, `text_mask bool [B, L]`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline.input import AudioBatchIterator
from melody_jax.audio.mel import semitone_filterbank
from melody_jax.evaluation.mcc import mulan_cycle_consistency
from melody_jax.frozen.stage_models import build_model
from melody_jax.models.mulan import FREQUENCY_SCALES, MuLan, contrastive_loss
from melody_jax.tasks.musicgen_conditions import word_dropout
from melody_jax.tasks.sources import TRAIN, SourcedTask, prepared_audio, stream_seed
from melody_jax.text.byte_tokenizer import tokenize
from melody_jax.text.key_swap import swap_key
from melody_jax.training.config import positive, require
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import host_to_global, process_rows
from melody_jax.training.task import Batch


def pick_texts(captions: np.ndarray, tags: np.ndarray, use_caption: np.ndarray) -> list[str]:
    """Caption where `use_caption` (and the caption is not empty), else the tag list."""
    return [c if (u and c) or not t else t for c, t, u in zip(captions, tags, use_caption)]


class TextAudioIterator:
    """Wraps the audio iterator; state = the audio iterator's position plus the batch index.

    `features` (optional) maps this host's audio rows `[B_local, T]` (numpy; the audio iterator's
    `feature_audio` field) to more per-row arrays made at data time — e.g. MusicGen's chromagram, from
    the target crop or another segment of its clip — which join the batch as global arrays too.
    `augment` (optional) maps (picked texts, captions, tags, rng) of this host's rows to the texts to
    tokenize — e.g. MusicGen's text augmentation — with an rng of (seed, batch index, first row).
    `negatives` (optional) maps those texts and an rng to one negative text per row or None (e.g. MuLan's
    key-swapped captions): the batch then holds `negative_tokens`, `negative_mask` and `has_negative`.
    """

    def __init__(self, audio: AudioBatchIterator, mesh: jax.sharding.Mesh, *, seed: int, global_batch_size: int,
                 caption_probability: float, max_text_length: int,
                 features: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None,
                 augment: Callable[..., list[str]] | None = None, feature_audio: str = "audio",
                 negatives: Callable[[list[str], np.random.Generator], list[str | None]] | None = None):
        self.audio, self.mesh, self.seed = audio, mesh, seed
        self.batch_size, self.p, self.max_length = global_batch_size, caption_probability, max_text_length
        self.features, self.augment, self.feature_audio = features, augment, feature_audio
        self.negatives = negatives
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        local = self.audio.next_local()
        use_caption = np.random.default_rng([self.seed, self.index]).random(self.batch_size) < self.p
        rows = process_rows(self.batch_size)
        texts = pick_texts(local["caption"], local["tags"], use_caption[rows])
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.index, rows.start, 1])
            texts = self.augment(texts, local["caption"], local["tags"], rng)
        tokens, mask = tokenize(texts, self.max_length)
        extra = self.features(local[self.feature_audio]) if self.features is not None else {}
        if self.negatives is not None:
            negatives = self.negatives(texts, np.random.default_rng([self.seed, self.index, rows.start, 2]))
            neg_tokens, extra["negative_mask"] = tokenize([n or "" for n in negatives], self.max_length)
            # a negative whose change lies past max_text_length would be its positive
            extra["has_negative"] = np.asarray([n is not None for n in negatives]) & (neg_tokens != tokens).any(-1)
            extra["negative_tokens"] = neg_tokens
        self.index += 1
        return host_to_global({"audio": local["audio"], "mask": local["mask"], "text_tokens": tokens, "text_mask": mask,
                               **extra}, self.mesh)

    def get_state(self) -> dict[str, Any]:
        return {"audio": self.audio.get_state(), "index": self.index}

    def set_state(self, state: dict[str, Any]) -> None:
        self.audio.set_state(state["audio"])
        self.index = int(state["index"])


class MuLanTask(SourcedTask):
    name = "mulan"
    sources = ("prepared_audio",)

    def validate(self) -> None:
        c = self.config
        m, d = c.model, c.data
        positive(c, "model.out_dim", "model.audio_layers", "model.text_layers", "model.embed_dim", "model.num_heads",
                 "model.mlp_dim", "model.n_fft", "model.hop_length", "model.n_mels", "model.patch_frames",
                 "model.patch_mels", "model.max_text_length", "data.sample_rate", "data.crop_seconds")
        self.check_data()
        require(m.frequency_scale in FREQUENCY_SCALES,
                f"config.model.frequency_scale={m.frequency_scale!r} must be one of {FREQUENCY_SCALES}")
        if m.frequency_scale == "semitone":
            try:
                semitone_filterbank(d.sample_rate, m.n_fft, m.n_mels, m.fmin)
            except ValueError as e:
                raise ConfigError(f"config.model: {e}") from None
        require(m.n_mels % m.patch_mels == 0,
                f"config.model.patch_mels={m.patch_mels} does not divide n_mels={m.n_mels}")
        require(m.embed_dim % m.num_heads == 0 and (m.embed_dim // m.num_heads) % 2 == 0,
                f"config.model.embed_dim={m.embed_dim} / num_heads={m.num_heads} must be an even integer (rotary)")
        frames = 1 + self.crop_samples // m.hop_length
        require(frames >= m.patch_frames, f"config.data.crop_seconds={d.crop_seconds} gives {frames} frames, "
                                          f"fewer than model.patch_frames={m.patch_frames}")
        tempo_lags = m.get("tempo_lags", 0)
        require(0 <= tempo_lags < frames, f"config.model.tempo_lags={tempo_lags} must lie in [0, {frames}): "
                                          f"lags of a crop of {frames} frames")
        require(not m.get("chroma_profile", False) or (m.frequency_scale == "semitone" and m.n_mels % 12 == 0),
                f"config.model.chroma_profile needs frequency_scale='semitone' and n_mels a multiple of 12 (whole "
                f"octaves), not {m.frequency_scale!r} and {m.n_mels}")
        require(0.0 <= d.caption_probability <= 1.0,
                f"config.data.caption_probability={d.caption_probability} must lie in [0, 1]")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")
        require(0.0 <= c.train.word_dropout < 1.0, f"config.train.word_dropout={c.train.word_dropout} must lie in [0, 1)")

    @property
    def crop_samples(self) -> int:
        return int(round(self.config.data.crop_seconds * self.config.data.sample_rate))

    @property
    def model(self) -> MuLan:
        return build_model(self.config).module

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        audio_emb, text_emb, log_scale = self.model.apply(
            {"params": params}, batch["audio"], batch["text_tokens"], batch["text_mask"], batch.get("mask"))
        negatives = None
        if "negative_tokens" in batch:
            negatives = (self.model.apply({"params": params}, batch["negative_tokens"], batch["negative_mask"],
                                          method=MuLan.embed_text), batch["has_negative"])
        loss, logits = contrastive_loss(text_emb, audio_emb, log_scale, negatives)
        accuracy = (logits.argmax(-1) == jnp.arange(logits.shape[0])).mean()
        return loss, {"accuracy": accuracy, "logit_scale": jnp.exp(log_scale),
                      "mcc": mulan_cycle_consistency(text_emb, audio_emb)}

    def batches(self, mesh, split: str) -> TextAudioIterator:
        c = self.config

        def augment(texts, captions, tags, rng):
            return [word_dropout(t, c.train.word_dropout, rng) for t in texts]

        def negatives(texts, rng):
            return [swap_key(t, rng) for t in texts]

        train = split == TRAIN
        return TextAudioIterator(prepared_audio(c, mesh, split, with_text=True), mesh,
                                 seed=stream_seed(c.seed, split), global_batch_size=c.train.batch_size,
                                 caption_probability=c.data.caption_probability,
                                 max_text_length=c.model.max_text_length, augment=augment if train else None,
                                 negatives=negatives if train and c.train.key_negatives else None)
