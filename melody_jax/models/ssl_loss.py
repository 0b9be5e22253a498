"""The SSL objectives: wav2vec 2.0 (contrastive over K distractors from the same utterance + diversity) and
HuBERT (cross-entropy on discrete targets at masked frames).

Distractors for a masked frame t are K other masked frames of the same utterance, drawn uniformly
with replacement (wav2vec 2.0 §3.2); a distractor whose codes equal the target's is the target
itself and is dropped (−inf), as in fairseq. Similarities are cosines / κ computed once as a
[B, T, T] matrix and gathered, so no [B, T, K, D] tensor of negatives is ever built.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

NEG_INF = -1e9


def sample_negatives(rng: jax.Array, mask: jax.Array, num_negatives: int) -> jax.Array:
    """int32 [B, T, K]: for each frame, K indices of masked frames of its utterance other than itself."""
    b, t = mask.shape
    masked_first = jnp.argsort(~mask, axis=1, stable=True)  # masked frames' indices, in time order
    n = mask.sum(1)
    rank = jnp.cumsum(mask, 1) - 1  # a masked frame's index among its utterance's masked frames
    u = jax.random.randint(rng, (b, t, num_negatives), 0, jnp.maximum(n - 1, 1)[:, None, None])
    u = u + (u >= rank[..., None])  # skip the frame itself
    u = jnp.minimum(u, t - 1)
    return jnp.take_along_axis(masked_first, u.reshape(b, -1), 1).reshape(b, t, num_negatives).astype(jnp.int32)


def contrastive_logits(context: jax.Array, targets: jax.Array, codes: jax.Array, negatives: jax.Array,
                       logit_temperature: float) -> jax.Array:
    """[B, T, 1 + K] logits: cosine(c_t, q_t) then cosine(c_t, q_neg) for each distractor, over κ."""
    def unit(x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), 1e-16))

    sims = jnp.einsum("btd,bsd->bts", unit(context), unit(targets),
                      precision=jax.lax.Precision.HIGHEST) / logit_temperature
    pos = jnp.diagonal(sims, axis1=1, axis2=2)
    neg = jnp.take_along_axis(sims, negatives, 2)
    neg_codes = jax.vmap(lambda c, i: c[i])(codes, negatives)  # [B, T, K, G]
    same = jnp.all(neg_codes == codes[:, :, None, :], -1)
    return jnp.concatenate([pos[..., None], jnp.where(same, NEG_INF, neg)], -1)


def wav2vec2_loss(out: dict[str, jax.Array], rng: jax.Array, *, num_negatives: int, logit_temperature: float,
                  num_codes: int, diversity_weight: float, feature_penalty_weight: float,
                  valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics) from the model's forward dict; frames count where masked in utterances with
    at least two masked frames (one needs a distractor). `valid [B, T]` (optional): frames of real audio;
    padding frames are neither scored nor drawn as distractors."""
    mask = out["mask"] if valid is None else out["mask"] & (valid > 0)
    negatives = sample_negatives(rng, mask, num_negatives)
    logits = contrastive_logits(out["context"], out["targets"], out["codes"], negatives, logit_temperature)
    weight = (mask & (mask.sum(1, keepdims=True) >= 2)).astype(jnp.float32)
    total = jnp.maximum(weight.sum(), 1.0)
    ce = jax.nn.logsumexp(logits, -1) - logits[..., 0]
    contrastive = jnp.sum(ce * weight) / total
    # A frame whose every distractor shares its codes is "right" for free: accuracy leaves such frames
    # out and `distractors_dropped` reports the share dropped, which nears 1 when the codebook collapses
    # to a few codes per clip (seen: a `small` run at lr 1e-3 reached 0.996 "accuracy" with 2 codes in use).
    dropped = logits[..., 1:] <= NEG_INF
    scored = weight * (~dropped.all(-1))
    accuracy = jnp.sum((jnp.argmax(logits, -1) == 0) * scored) / jnp.maximum(scored.sum(), 1.0)
    dropped_share = jnp.sum(dropped.mean(-1) * weight) / total
    in_use = jnp.any(jax.nn.one_hot(out["codes"], num_codes // out["codes"].shape[-1], dtype=jnp.bool_),
                     axis=(0, 1)).sum()  # distinct codes in the batch, summed over groups (at most G·V)
    diversity = (num_codes - out["prob_perplexity"]) / num_codes
    loss = contrastive + diversity_weight * diversity + feature_penalty_weight * out["feature_penalty"]
    return loss, {"contrastive_loss": contrastive, "accuracy": accuracy, "diversity_loss": diversity,
                  "distractors_dropped": dropped_share, "codes_in_use": in_use.astype(jnp.float32),
                  "prob_perplexity": out["prob_perplexity"], "code_perplexity": out["code_perplexity"],
                  "feature_penalty": out["feature_penalty"], "mask_fraction": jnp.mean(mask.astype(jnp.float32))}


def hubert_loss(out: dict[str, jax.Array], targets: jax.Array, *, codebook_weights: Sequence[float],
                unmasked_weight: float, feature_penalty_weight: float, valid: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total loss, metrics): cross-entropy of the int32 [B, T, C] targets (C codebooks, logits [B, T, C, K]),
    summed over codebooks with `codebook_weights` (HuBERT's cluster ensembles), averaged over masked frames,
    plus `unmasked_weight` × the same at unmasked frames (HuBERT's α = 1 / 1 − α weighting, α = 1 by default);
    `valid [B, T]` (optional): frames of real audio, the only ones scored. Accuracy and `majority` average over
    codebooks, the targets and predictions in use add up over them."""
    logits, mask = out["logits"], out["mask"]
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    ce = ce @ jnp.asarray(codebook_weights, jnp.float32)
    real = jnp.ones(mask.shape, jnp.float32) if valid is None else (valid > 0).astype(jnp.float32)
    masked, unmasked = mask.astype(jnp.float32) * real, (~mask).astype(jnp.float32) * real
    ce_masked = jnp.sum(ce * masked) / jnp.maximum(masked.sum(), 1.0)
    ce_unmasked = jnp.sum(ce * unmasked) / jnp.maximum(unmasked.sum(), 1.0)
    right = jnp.mean((jnp.argmax(logits, -1) == targets).astype(jnp.float32), -1)
    c, k = logits.shape[-2:]
    target_counts = jax.nn.one_hot(targets, k).reshape(-1, c, k).sum(0)  # [C, K]
    predicted = jnp.any(jax.nn.one_hot(jnp.argmax(logits, -1), k, dtype=jnp.bool_), axis=(0, 1))
    loss = ce_masked + unmasked_weight * ce_unmasked + feature_penalty_weight * out["feature_penalty"]
    return loss, {"masked_loss": ce_masked, "unmasked_loss": ce_unmasked,
                  "accuracy": jnp.sum(right * masked) / jnp.maximum(masked.sum(), 1.0),
                  "unmasked_accuracy": jnp.sum(right * unmasked) / jnp.maximum(unmasked.sum(), 1.0),
                  "majority": jnp.mean(target_counts.max(-1) / jnp.maximum(target_counts.sum(-1), 1.0)),
                  "targets_in_use": jnp.sum(target_counts > 0).astype(jnp.float32),
                  "predictions_in_use": jnp.sum(predicted).astype(jnp.float32),
                  "feature_penalty": out["feature_penalty"], "mask_fraction": jnp.mean(masked)}
