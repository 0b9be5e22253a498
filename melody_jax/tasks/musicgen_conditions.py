"""MusicGen's condition dropout and text augmentation in training, after audiocraft's musicgen recipe.

Condition dropout (in the jitted loss): with p = `train.cfg_dropout` every condition is nulled
together (audiocraft's `ClassifierFreeGuidanceDropout`: 0.3 text-to-music, 0.2 chroma-to-music);
otherwise the text is nulled with p = `train.cfg_dropout_text` and the melody with
p = `train.cfg_dropout_melody`, independently (audiocraft's `AttributeDropout`: `self_wav` 0.5, no
text). So both conditions are null — what the unconditional branch of guided sampling feeds — with
probability p + (1 − p)·p_text·p_melody. audiocraft makes each draw once per step for the whole batch
(`train.cfg_dropout_per="batch"`); "example" draws per example (today's default: p = 0, 0.3, 0.2).

Text augmentation (on the host, a pure function of the seed, batch index and host): audiocraft's
condition merging — with p = `merge_text_p` the metadata is appended to the description, each field
kept with p = `drop_other_p` (audiocraft's name; it is the keep probability), shuffled and joined with
". ", the description itself dropped with p = `drop_desc_p` — with our tag list as the metadata
fields; then word dropout (audiocraft's T5 conditioner: each space-separated word dropped with
p = `word_dropout`). A text left empty is the null text, as in audiocraft.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

DROPOUT_SCOPES = ("example", "batch")


def condition_dropout(rng: jax.Array, batch: int, *, joint: float, text: float, melody: float,
                      per: str = "example") -> tuple[jax.Array, jax.Array]:
    """(drop_text, drop_melody) `bool [batch]`: the joint draw, then one draw per condition (module docstring)."""
    shape = () if per == "batch" else (batch,)
    k_text, k_melody = jax.random.split(rng)
    k_joint = jax.random.fold_in(rng, 2)
    both = jax.random.bernoulli(k_joint, joint, shape)
    drop_text = both | jax.random.bernoulli(k_text, text, shape)
    drop_melody = both | jax.random.bernoulli(k_melody, melody, shape)
    return jnp.broadcast_to(drop_text, (batch,)), jnp.broadcast_to(drop_melody, (batch,))


def empty_text(text_mask: jax.Array) -> jax.Array:
    """`bool [B]`: rows whose text is empty (the leading [CLS] alone), which train as the null text."""
    return text_mask.sum(-1) <= 1


def merge_metadata(caption: str, tags: str, rng: np.random.Generator, *, merge_p: float, drop_desc_p: float,
                   keep_other_p: float) -> str:
    """audiocraft's description merging with our ", "-joined tags as the metadata fields."""
    description = caption or None
    metadata = ""
    if rng.random() < merge_p:
        fields = [t for t in (s.strip() for s in tags.split(",")) if t]
        kept = [t for t in fields if rng.random() < keep_other_p]
        rng.shuffle(kept)
        metadata = ". ".join(kept)
        if rng.random() < drop_desc_p:
            description = None
    if description is None:
        return metadata if len(metadata) > 1 else ""
    return ". ".join([description.rstrip("."), metadata]).strip()


def word_dropout(text: str, p: float, rng: np.random.Generator) -> str:
    """Each space-separated word dropped with probability p (audiocraft's T5 conditioner)."""
    if p <= 0:
        return text
    words = text.split(" ")
    keep = rng.random(len(words)) >= p
    return " ".join(w for w, k in zip(words, keep) if k)


def augment_texts(texts: Sequence[str], captions: Sequence[str] | None, tags: Sequence[str] | None,
                  rng: np.random.Generator, train_config) -> list[str]:
    """Merging (where captions and tags are given and `train.merge_text_p` > 0), then word dropout."""
    t = train_config
    out = list(texts)
    if captions is not None and tags is not None and t.merge_text_p > 0:
        out = [merge_metadata(c, g, rng, merge_p=t.merge_text_p, drop_desc_p=t.drop_desc_p,
                              keep_other_p=t.drop_other_p) for c, g in zip(captions, tags)]
    return [word_dropout(x, t.word_dropout, rng) for x in out]
