"""Semantic LM stage (DESIGN §4.4, §7): next-token loss on semantic tokens after 12 MuLan tokens.

Data sources (`config.data.source`, melody_jax/tasks/sources.py):
- "synthetic": a rule that the tiny preset learns in 150 steps and a test can check. With K =
  data.synthetic_codes and a start c ~ U[0, K) and stride b ~ U{1..data.num_strides} per example, the
  stream x_i = (c + i·b) mod K is cut into the M MuLan codes and the T semantic codes, so
  s_t = (s_{t-1} + b) mod K with s_{-1} = m_{M-1} and b = m_{M-1} − m_{M-2}: the first semantic token
  is a function of the prefix alone, later ones of the prefix and the previous token. Batches are a
  pure function of (split's stream seed, batch index), so the iterator's position is one integer.
- "cached": the records `launch.tokenize` writes per split (what large runs use: the frozen models run once).
- "frozen_models": audio crops of `semantic_len` tokens from a prepared dataset (`data.path`), turned
  into MuLan tokens (MuLan audio tower + RVQ) and semantic tokens (SSL Conformer + k-means) inside the
  jitted step by the frozen stages named in `upstream.{ssl,kmeans,mulan,rvq}`, loaded by `setup`
  (their parameters ride along with every batch: `frozen.inputs.FrozenInputs`).
`model.cfg_dropout` of the training rows see the null prefix instead (`models.semantic_lm.NULL_CODE`), which
classifier-free guidance contrasts with the prompt's at sampling time.
`data.text_token_share` of the rows (drawn per row in the step) are conditioned on the MuLan *text* tokens
of their clip's caption instead of the crop's audio tokens ("cached": the records' `mulan_text_tokens`;
"frozen_models": the caption run through MuLan's text tower + RVQ in the step). Sampling conditions on
text tokens: a MuLan too small to put a caption and its audio on the same tokens (or crops too short to
show a tempo to its audio tower) leaves an LM trained on audio tokens alone with prefixes at sampling
time that it never saw [not in the paper, which trains on audio tokens only].
Padding never trains: semantic tokens whose samples are not all real (the crop's `mask`; an optional
`semantic_mask [B, T]` beside cached or synthetic tokens) are left out of the cross-entropy, and the
MuLan tokens come from the valid samples only.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from data_pipeline.indexed import IndexedBatches
from melody_jax.audio.padding import frame_mask
from melody_jax.frozen.checks import need, require_upstream
from melody_jax.frozen.inputs import FrozenInputs
from melody_jax.frozen.mulan import FrozenMuLan
from melody_jax.frozen.semantic import SemanticTokenizer
from melody_jax.frozen.stage_models import build_model
from melody_jax.models.semantic_lm import NULL_CODE, SemanticLM
from melody_jax.tasks.mulan import TextAudioIterator
from melody_jax.tasks.sources import SourcedTask, cache_shards, prepared_audio, stream_seed
from melody_jax.training.config import positive, require
from melody_jax.training.sharding import config_rules
from melody_jax.training.task import Batch

FROZEN_STAGES = ("ssl", "kmeans", "mulan", "rvq")


def synthetic_tokens(seed: int, index: int, batch: int, num_mulan_tokens: int, semantic_len: int, codes: int,
                     num_strides: int) -> tuple[np.ndarray, np.ndarray]:
    """(mulan int32 [batch, M], semantic int32 [batch, T]) following the module docstring's rule."""
    rng = np.random.default_rng([seed, index])
    start = rng.integers(0, codes, (batch, 1))
    stride = rng.integers(1, num_strides + 1, (batch, 1))
    stream = ((start + stride * np.arange(num_mulan_tokens + semantic_len)) % codes).astype(np.int32)
    return stream[:, :num_mulan_tokens], stream[:, num_mulan_tokens:]


def rule_targets(mulan: np.ndarray, semantic: np.ndarray, codes: int) -> np.ndarray:
    """The token the rule prescribes at each position of `semantic`, given its actual previous token."""
    stride = (mulan[:, -1:] - mulan[:, -2:-1]) % codes
    previous = np.concatenate([mulan[:, -1:], semantic[:, :-1]], axis=1)
    return (previous + stride) % codes


def synthetic_batches(config, mesh, seed: int) -> IndexedBatches:
    """Endless global batches of the synthetic rule; the position is the batch index."""
    c = config

    def make(index: int) -> dict[str, np.ndarray]:
        mulan, semantic = synthetic_tokens(seed, index, c.train.batch_size, c.model.num_mulan_tokens,
                                           c.data.semantic_len, c.data.synthetic_codes, c.data.num_strides)
        return {"mulan_tokens": mulan, "semantic_tokens": semantic}

    return IndexedBatches(make, c.train.batch_size, mesh)


class SemanticLMTask(SourcedTask):
    name = "semantic_lm"
    sources = ("synthetic", "cached", "frozen_models")
    tokenizer: SemanticTokenizer | None = None  # data.source="frozen_models": set by `setup`
    mulan: FrozenMuLan | None = None

    def validate(self) -> None:
        c = self.config
        m, d = c.model, c.data
        self.check_data()
        positive(c, "model.num_layers", "model.embed_dim", "model.num_heads", "model.mlp_dim",
                 "model.num_mulan_tokens", "model.mulan_codebook_size", "model.semantic_vocab_size",
                 "data.semantic_len", "data.shuffle_buffer")
        require(m.embed_dim % m.num_heads == 0,
                f"config.model.num_heads={m.num_heads} does not divide embed_dim={m.embed_dim}")
        require((m.embed_dim // m.num_heads) % 2 == 0,
                f"config.model.embed_dim={m.embed_dim} / num_heads={m.num_heads} must be even (rotary)")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")
        if d.source == "synthetic":
            positive(c, "data.synthetic_codes", "data.num_strides")
            require(d.synthetic_codes <= min(m.mulan_codebook_size, m.semantic_vocab_size),
                    f"config.data.synthetic_codes={d.synthetic_codes} exceeds the MuLan codebook or the "
                    "semantic vocabulary")
            require(d.num_strides < d.synthetic_codes,
                    f"config.data.num_strides={d.num_strides} must be < data.synthetic_codes={d.synthetic_codes}")
            require(m.num_mulan_tokens >= 2, "config.model.num_mulan_tokens must be >= 2 for the synthetic rule")
        elif d.source == "frozen_models":
            require_upstream(c, *FROZEN_STAGES)
        require(0.0 <= m.cfg_dropout < 1.0, f"config.model.cfg_dropout={m.cfg_dropout} must lie in [0, 1)")
        require(0.0 <= d.text_token_share <= 1.0,
                f"config.data.text_token_share={d.text_token_share} must be in [0, 1]")
        require(d.text_token_share == 0.0 or d.source in ("cached", "frozen_models"),
                f"config.data.text_token_share={d.text_token_share}: data.source={d.source!r} has no captions "
                "(\"cached\" or \"frozen_models\" do)")

    @property
    def model(self) -> SemanticLM:
        return build_model(self.config).module

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        """data.source="frozen_models": the SSL + k-means tokenizer and MuLan + RVQ of `upstream.*` on `mesh`,
        checked against this LM."""
        if self.config.data.source != "frozen_models" or self.tokenizer is not None:
            return
        up, m, d = self.config.upstream, self.config.model, self.config.data
        rules = config_rules(self.config)
        tokenizer = SemanticTokenizer.load(up.kmeans, up.ssl, mesh, rules,
                                           fields=("config.upstream.kmeans", "config.upstream.ssl"))
        mulan = FrozenMuLan.load(up.mulan, up.rvq, mesh, rules, fields=("config.upstream.mulan", "config.upstream.rvq"))
        need(tokenizer.vocab_size == m.semantic_vocab_size, f"config.upstream.kmeans: k-means has "
             f"{tokenizer.vocab_size} clusters, model.semantic_vocab_size is {m.semantic_vocab_size}")
        need((mulan.num_tokens, mulan.codebook_size) == (m.num_mulan_tokens, m.mulan_codebook_size),
             f"config.upstream.rvq: rvq has {mulan.num_tokens} levels of {mulan.codebook_size} codes, the model "
             f"expects {m.num_mulan_tokens} of {m.mulan_codebook_size}")
        need(tokenizer.sample_rate == d.sample_rate, f"config.upstream.ssl: ssl works at {tokenizer.sample_rate} Hz, "
             f"config.data.sample_rate is {d.sample_rate}")
        self.tokenizer, self.mulan = tokenizer, mulan

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        text_tokens = batch.get("mulan_text_tokens")  # data.text_token_share > 0
        if "frozen" in batch:  # data.source="frozen_models": tokenise the audio crops (and captions) here
            mulan_tokens, semantic = self._tokens(batch["frozen"], batch["audio"], batch["mask"])
            valid = frame_mask(batch["mask"], self.tokenizer.hop, semantic.shape[1])
            if "text_tokens" in batch:
                text_tokens = self.mulan.text_tokens_fn(batch["frozen"]["mulan"], batch["text_tokens"],
                                                        batch["text_mask"])
        else:
            mulan_tokens, semantic = batch["mulan_tokens"], batch["semantic_tokens"]
            valid = batch.get("semantic_mask", jnp.ones(semantic.shape, jnp.float32))
        if text_tokens is not None:  # that share of the rows, drawn here, are conditioned on their caption
            text = jax.random.bernoulli(rng, self.config.data.text_token_share, (semantic.shape[0], 1))
            mulan_tokens = jnp.where(text, text_tokens, mulan_tokens)
        dropout = self.config.model.cfg_dropout
        if train and dropout > 0:  # its own key: the text rows are drawn as without dropout
            null = jax.random.bernoulli(jax.random.fold_in(rng, 1), dropout, (semantic.shape[0], 1))
            mulan_tokens = jnp.where(null, NULL_CODE, mulan_tokens)
        stream = jnp.concatenate([mulan_tokens, semantic], axis=1)
        # logits at position p predict stream[p + 1]: the last MuLan position predicts the first semantic token
        logits = self.model.apply({"params": params}, stream[:, :-1])[:, self.config.model.num_mulan_tokens - 1:]
        weight = jnp.asarray(valid, jnp.float32)  # tokens of padding are no targets (a causal LM: nor context)
        total = jnp.maximum(weight.sum(), 1.0)
        loss = (optax.softmax_cross_entropy_with_integer_labels(logits, semantic) * weight).sum() / total
        return loss, {"accuracy": ((logits.argmax(-1) == semantic) * weight).sum() / total}

    def _tokens(self, frozen: dict[str, Any], audio: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        semantic = self.tokenizer.fn(frozen["ssl"], frozen["centroids"], audio)[:, : self.config.data.semantic_len]
        return self.mulan.audio_tokens_fn(frozen["mulan"], audio, mask), semantic

    def _audio(self, mesh, split: str):
        tokenizer, mulan = self.tokenizer, self.mulan
        data = self.config.data.copy_and_resolve_references()
        data.crop_seconds = self.config.data.semantic_len * tokenizer.hop / data.sample_rate
        frozen = {"ssl": tokenizer.ssl_params, "centroids": tokenizer.centroids, "mulan": mulan.params}
        if not data.text_token_share:
            return FrozenInputs(prepared_audio(self.config, mesh, split, with_text=False, data=data), frozen,
                                keys=("audio", "mask"))
        c = self.config
        audio = TextAudioIterator(prepared_audio(c, mesh, split, with_text=True, data=data), mesh,
                                  seed=stream_seed(c.seed, split), global_batch_size=c.train.batch_size,
                                  caption_probability=1.0, max_text_length=mulan.max_text_length)
        return FrozenInputs(audio, frozen)

    def _records(self, mesh, shards: list[tuple[str, int]]):
        from data_pipeline.token_records import Field, RecordIterator  # TensorFlow: only when used

        c = self.config
        mulan = Field((c.model.num_mulan_tokens,), c.model.mulan_codebook_size)
        fields = {"mulan_tokens": mulan, "semantic_tokens": Field((c.data.semantic_len,), c.model.semantic_vocab_size)}
        if c.data.text_token_share:
            fields["mulan_text_tokens"] = mulan
        return RecordIterator(shards, fields, global_batch_size=c.train.batch_size, mesh=mesh, seed=c.seed,
                              shuffle_buffer=c.data.shuffle_buffer)

    def batches(self, mesh, split: str):
        source = self.config.data.source
        if source == "cached":
            return self._records(mesh, cache_shards(self.config.data.path, split))
        if source == "frozen_models":
            return self._audio(mesh, split)
        return synthetic_batches(self.config, mesh, stream_seed(self.config.seed, split))

    def describe(self, params: Any) -> dict[str, int]:
        return super().describe(params["decoder"])
