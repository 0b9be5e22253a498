"""How good is each stage of a MeLoDy bundle on its own, on held-out clips (issue 23)? Where the chain
does not follow its prompts, this table says which stage holds it back.

- VAE-GAN: decode(encode(x)) against x — MR-STFT distance (the stage's own STFT resolutions), log-mel
  L1, SI-SNR (`audio.metrics`);
- semantic tokens: nearest-centroid probes of key, lead, drums and tempo band on the clips' token
  histograms (`token_probe`), beside the majority share, and how much of the onset envelope (the beat) the
  tokens mark (`token_probe.beat_r2`);
- down the chain (`audio_chain`): the evaluation's own checks (tempo, key, drums, instrument) and musicnn FAD
  of the clips, their VAE-GAN reconstructions, the DPD's rendering of their own tokens, music generated from their
  MuLan audio tokens and from their captions, each against the clip's attributes — so an attribute or a distance
  the generated music misses is traced to the first stage that loses it; and tempo read from tokens by the beat
  probe's regression (`token_probe.envelope_reader`), of the clips' tokens and of the semantic LM's continuations
  of them (`MeLoDy.continue_tokens`), the LM apart from the DPD;
- MuLan: text → audio retrieval recall@1 and @5 over the clips' captions, beside chance k / N, and what its text
  tower keeps of a caption: the token probes on the text embeddings of synthetic captions (`text_probes`), so a
  key the prompt names but the LM's prefix never carries reads as MuLan's loss;
- semantic LM: held-out cross-entropy (nats per token) on crops cut like its training records (MuLan
  tokens of the crop, then its semantic tokens), beside the unigram entropy of that held-out token
  stream — with the share of the vocabulary it uses and of tokens that repeat their predecessor, so a
  low loss on a collapsed or copied stream reads as such;
- DPD: velocity MSE and SI-SNR improvement at δ = π/4 (`DPDTask.fixed_angle_metrics`) on held-out
  latents with their true tokens and with the tokens permuted across all crops (same noise): equal
  numbers mean the DPD does not use its tokens.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from data_pipeline.captions import tempo_band
from data_pipeline.synthetic import synthetic_prompts
from melody_jax.audio.losses import resolutions
from melody_jax.audio.metrics import reconstruction_metrics
from melody_jax.evaluation.attributes import accuracy, leave_one_out_predictions, named, tempo_matches
from melody_jax.evaluation.fad import frechet_audio_distance
from melody_jax.evaluation.musicnn import musicnn_features
from melody_jax.evaluation.token_probe import (BEAT_CONTEXT, beat_r2, envelope_reader, feature_probe, onset_envelopes,
                                               probe, token_tempi)
from melody_jax.pipelines.melody import MeLoDy
from melody_jax.tasks.dpd import EVAL_ANGLE, DPDTask
from melody_jax.tasks.semantic_lm import SemanticLMTask
from melody_jax.training.errors import EvaluationError
from melody_jax.training.sharding import activate

RECALL_AT = (1, 5)
CONTINUATION_SECONDS = 8.0  # the LM's continuation in the tempo rows: ≥ 8 beats at the slowest synthetic tempo
# attribute → the label a clip's synthetic attributes give it
PROBES: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "key (tonic)": lambda a: a["tonic"], "lead": lambda a: a["lead"], "drums": lambda a: a["drums"],
    "tempo band": lambda a: tempo_band(a["tempo_bpm"])}

NAMED = {"key (tonic)": "key", "drums": "drums"}  # the probes read over the captions that say their attribute
TEXT_PROMPTS, TEXT_SEED = 256, 3  # the text probes' synthetic captions (text only): another seed than any dataset's


def text_probes(text_embeddings: Callable[[list[str]], Any],
                prompts: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, dict[str, Any] | None]:
    """The token probes (`PROBES`, `token_probe.feature_probe`) on the text embeddings of synthetic captions:
    what MuLan's text tower keeps of what a prompt says. The key and the drums count over the captions that say them
    (`attributes.named`)."""
    emb = np.asarray(text_embeddings([t for t, _ in prompts]))
    names = [named(t, a) for t, a in prompts]
    out = {}
    for name, label in PROBES.items():
        said = NAMED.get(name)
        rows = [i for i, n in enumerate(names) if said is None or n[said]]
        out[name] = feature_probe(emb[rows], [label(prompts[i][1]) for i in rows])
    return out


def _batched(fn: Callable[[Any, int], Any], x: Any, batch_size: int) -> np.ndarray:
    """fn(rows, index of the first row) over batches of rows of x, outputs concatenated (at most two shapes: one
    compile for the tail); a sampler seeded with seed + index draws new noise for each batch."""
    return np.concatenate([np.asarray(fn(x[i:i + batch_size], i)) for i in range(0, len(x), batch_size)])


def _rows(fn: Callable[[np.ndarray], Any], x: np.ndarray, batch_size: int) -> np.ndarray:
    """fn over batches of rows of x, outputs concatenated."""
    return _batched(lambda rows, _: fn(rows), x, batch_size)


def _means(fn: Callable[[int, dict[str, np.ndarray]], Mapping[str, Any]], arrays: Mapping[str, np.ndarray],
           batch_size: int) -> dict[str, float]:
    """Row-weighted means over batches of fn(batch index, batch) → {name: batch mean}."""
    n = len(next(iter(arrays.values())))
    totals: dict[str, float] = {}
    for i, start in enumerate(range(0, n, batch_size)):
        out = jax.device_get(fn(i, {k: v[start:start + batch_size] for k, v in arrays.items()}))
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + float(v) * min(batch_size, n - start)
    return {k: v / n for k, v in totals.items()}


def crops(audio: np.ndarray, samples: int) -> np.ndarray:
    """Non-overlapping crops [N · k, samples] of audio [N, T] (k whole crops per clip, in clip order)."""
    k = audio.shape[1] // samples
    if k == 0:
        raise EvaluationError(f"held-out clips of {audio.shape[1]} samples are shorter than one crop of {samples}")
    return audio[:, : k * samples].reshape(-1, samples)


def vae_quality(vae, audio: np.ndarray, batch_size: int = 8) -> dict[str, float]:
    """MR-STFT distance, log-mel L1 and SI-SNR (dB) of vae.decode(vae.encode(x)) against x [N, T] (trimmed
    to whole latent frames), averaged over clips; `vae` a `FrozenVAE` or any object with its interface."""
    w = vae.config.loss
    metrics = jax.jit(functools.partial(reconstruction_metrics, sample_rate=vae.sample_rate,
                                        resolutions=resolutions(w.stft_n_ffts, w.stft_hops, w.stft_wins)))
    audio = audio[:, : audio.shape[1] // vae.hop * vae.hop]
    return _means(lambda _, b: metrics(vae.decode(vae.encode(b["x"])), b["x"]), {"x": audio}, batch_size)


def stream_statistics(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Unigram entropy (nats) of tokens [N, T], the share of the vocabulary they use, and the share of
    tokens equal to their predecessor in the same row."""
    p = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size) / tokens.size
    nz = p[p > 0]
    return {"entropy_nats": float(-(nz * np.log(nz)).sum()) + 0.0, "distinct_fraction": float(len(nz) / vocab_size),
            "repeat_rate": float(np.mean(tokens[:, 1:] == tokens[:, :-1]))}


def retrieval_recall(text_emb: np.ndarray, audio_emb: np.ndarray, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """Text → audio recall@k: the share of texts i whose own audio i ranks among the k most cosine-similar
    audios. Ties count against it (an audio as similar as the true one ranks before it), so a collapsed
    embedding that scores every pair alike reads 0, not 1."""
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
    sim = unit(np.asarray(text_emb, np.float64)) @ unit(np.asarray(audio_emb, np.float64)).T
    rank = (sim >= np.diag(sim)[:, None]).sum(1) - 1
    return {k: float(np.mean(rank < k)) for k in ks}


def lm_quality(task: SemanticLMTask, params: Any, mulan_tokens: np.ndarray, semantic: np.ndarray,
               caption_tokens: np.ndarray | None = None, seed: int = 0, batch_size: int = 8) -> dict[str, float]:
    """The LM task's own held-out loss (cross-entropy, nats per token) and next-token accuracy with the crops'
    MuLan audio tokens as prefix; its loss with those prefixes permuted across the crops (no higher: the LM
    ignores its prefix) and, given `caption_tokens` [N, Q], with the prefix sampling gives it (their clips'
    captions' MuLan text tokens)."""
    step = jax.jit(lambda p, b: task.loss(p, b, jax.random.key(0), train=False))

    def fn(_, b):
        loss, metrics = step(params, b)
        return {"loss": loss, **metrics}

    def means(prefix: np.ndarray) -> dict[str, float]:
        return _means(fn, {"mulan_tokens": prefix, "semantic_tokens": semantic}, batch_size)

    out = means(mulan_tokens)
    shuffled = mulan_tokens[np.random.default_rng(seed).permutation(len(mulan_tokens))]
    out["loss_shuffled_prefix"] = means(shuffled)["loss"]
    if caption_tokens is not None:
        out["loss_caption_prefix"] = means(caption_tokens)["loss"]
    return out


def dpd_quality(task: DPDTask, params: Any, latents: np.ndarray, tokens: np.ndarray, seed: int = 0,
                batch_size: int = 8) -> dict[str, dict[str, float]]:
    """`fixed_angle_metrics` at δ = π/4 with the true tokens and with all tokens permuted across the crops;
    both draw the same noise, so only the tokens differ."""
    step = jax.jit(lambda p, b, k: task.fixed_angle_metrics(p, b, k, EVAL_ANGLE))
    key = jax.random.key(seed)
    shuffled = np.random.default_rng(seed).permutation(tokens.ravel()).reshape(tokens.shape)
    return {name: _means(lambda i, b: step(params, b, jax.random.fold_in(key, i)),
                         {"latents": latents, "semantic_tokens": t}, batch_size)
            for name, t in (("true", tokens), ("shuffled", shuffled))}


# audio down the chain (`audio_chain`), each source one stage further from the clip than the one before
CHAIN = {"clips": "the clips", "vae_gan": "VAE-GAN reconstructions", "dpd": "DPD renders of the clips' tokens",
         "audio_prompt": "generated from the clips' MuLan audio tokens (LM, DPD)",
         "text": "generated from the clips' captions (MuLan text tower, LM, DPD)"}


def audio_chain(melody: MeLoDy, audio: np.ndarray, tokens: np.ndarray, clips: Sequence[Mapping[str, Any]],
                seed: int = 0, batch_size: int = 8) -> dict[str, dict[str, float]]:
    """The evaluation's checks (tempo ±5 %, key and mode, drums, lead instrument: `evaluation.attributes`) and
    its musicnn FAD, down the chain (`CHAIN`), each source checked against its clip's own attributes: the clips
    audio [N, T], their VAE-GAN reconstructions, their tokens [N, T'] rendered by the DPD (`generate_from_tokens`),
    music generated from their MuLan audio tokens (`generate_from_audio_prompt`: no text tower) and from their
    captions (`generate`: the text path), each as long as the DPD's render, at the bundle's sampling settings.
    Instrument: nearest centroid on the clips' musicnn embeddings without the clip a row came from. FAD: a
    source's rows of the first half of the clips against the clips' second half, so the clips' own row is the
    floor at that count. A stage that loses an attribute shows as the first row where it falls."""
    rendered = _batched(lambda t, i: melody.generate_from_tokens(t, seed=seed + i).audio, tokens, batch_size)
    n, seconds = rendered.shape[1], rendered.shape[1] / melody.sample_rate
    audio = audio[:, :n]
    captions = np.asarray([c["caption"] for c in clips], object)
    sources = {
        "clips": audio, "vae_gan": _rows(lambda x: melody.vae.decode(melody.vae.encode(x)), audio, batch_size),
        "dpd": rendered,
        "audio_prompt": _batched(lambda x, i: melody.generate_from_audio_prompt(x, seconds, seed=seed + i).audio,
                                 audio, batch_size),
        "text": _batched(lambda c, i: melody.generate(list(c), seconds, seed=seed + i).audio, captions, batch_size)}
    sources = {name: x[:, :n] for name, x in sources.items()}
    features = musicnn_features([row for x in sources.values() for row in x], melody.sample_rate)
    embeddings, owner = features.clip_embeddings(), features.clip_of_patch
    count, asked = len(audio), [c["attributes"] for c in clips]
    leads = [a["lead"] for a in asked]
    second_half = features.embeddings[(owner >= count // 2) & (owner < count)]
    out = {}
    for k, (name, x) in enumerate(sources.items()):
        instruments = leave_one_out_predictions(embeddings[:count], leads, embeddings[k * count:(k + 1) * count])
        first_half = features.embeddings[(owner >= k * count) & (owner < k * count + count // 2)]
        out[name] = {**accuracy(list(x), melody.sample_rate, asked, instruments),
                     "fad_musicnn": frechet_audio_distance(first_half, second_half)}
    return out


def token_tempo(melody: MeLoDy, audio: np.ndarray, tokens: np.ndarray, envelopes: np.ndarray,
                bpm: Sequence[float], seed: int = 0, batch_size: int = 8) -> dict[str, float]:
    """Tempo accuracy (±5 %) read from tokens without the DPD (`token_probe.envelope_reader`, fitted on the clips'
    tokens [N, T'] and onset envelopes at the token rate [N, T']): of the clips' own tokens and of the semantic
    LM's continuation of each clip's first half (`continue_tokens`, CONTINUATION_SECONDS, the bundle's sampling
    settings); beside `one_tempo_share`."""
    rate, hop = melody.sample_rate, melody.tokenizer.hop
    first_half = audio[:, : tokens.shape[1] // 2 * hop]
    continued = _rows(lambda x: melody.continue_tokens(x, round(CONTINUATION_SECONDS * melody.token_rate),
                                                       seed=seed), first_half, batch_size)
    read = envelope_reader(tokens, envelopes, melody.tokenizer.vocab_size)
    hits = lambda tempi: float(np.mean([tempo_matches(e, b) for e, b in zip(tempi, bpm)]))  # noqa: E731
    return {"tokens": hits(token_tempi(read, tokens, rate, hop)),
            "lm_continuation": hits(token_tempi(read, continued, rate, hop)), "one_tempo": one_tempo_share(bpm)}


def one_tempo_share(bpm: Sequence[float]) -> float:
    """The largest share of clips that one tempo (one of theirs) matches within ±5 %: what a stream keeping a
    single tempo, whatever it is asked, scores at best — the tempo rows' no-information reference."""
    return max(float(np.mean([tempo_matches(c, b) for b in bpm])) for c in bpm)


def stage_quality(melody: MeLoDy, clips: Sequence[Mapping[str, Any]], seed: int = 0,
                  batch_size: int = 8) -> dict[str, Any]:
    """The table's figures for `clips` (dicts of `audio` at the bundle's rate, `caption` and, for the
    token probes, synthetic `attributes`; `data_pipeline.builder.read_clips`), cut to the shortest clip."""
    if len(clips) < 4:
        raise EvaluationError(f"the stage table needs ≥ 4 held-out clips, got {len(clips)}")
    hop = melody.tokenizer.hop
    length = min(len(c["audio"]) for c in clips) // hop * hop
    audio = np.stack([np.asarray(c["audio"][:length], np.float32) for c in clips])
    lm_config, dpd_config = melody.configs["semantic_lm"], melody.configs["dpd"]
    vocab = melody.tokenizer.vocab_size
    labelled = all(c.get("attributes") for c in clips)
    with activate(melody.mesh, melody.rules):
        tokens = _rows(melody.tokenizer, audio, batch_size)
        envelopes = onset_envelopes(audio, melody.sample_rate, hop, tokens.shape[1])
        captions = [c["caption"] for c in clips]
        text = np.asarray(melody.mulan.text_embeddings(captions))
        lm_crops = crops(audio, melody.lm_window * hop)
        mulan_tokens = _rows(melody.mulan.audio_tokens, lm_crops, batch_size)
        caption_tokens = np.repeat(np.asarray(melody.mulan.text_tokens(captions)), len(lm_crops) // len(clips), 0)
        lm_semantic = _rows(melody.tokenizer, lm_crops, batch_size)
        dpd_crops = crops(audio, melody.window_tokens * hop)
        table = {
            "clips": len(clips), "seconds": length / melody.sample_rate,
            "vae_gan": vae_quality(melody.vae, audio, batch_size),
            "tokens": {name: probe(tokens, [label(c["attributes"]) for c in clips], vocab) if labelled else None
                       for name, label in PROBES.items()},
            "beat_r2": beat_r2(tokens, envelopes, vocab),
            "chain": audio_chain(melody, audio, tokens, clips, seed, batch_size) if labelled else None,
            "tempo": token_tempo(melody, audio, tokens, envelopes, [c["attributes"]["tempo_bpm"] for c in clips],
                                 seed, batch_size) if labelled else None,
            "mulan": {f"recall@{k}": r for k, r in retrieval_recall(
                text, _rows(melody.mulan.audio_embeddings, audio, batch_size)).items()},
            "mulan_text": text_probes(melody.mulan.text_embeddings, synthetic_prompts(TEXT_PROMPTS, TEXT_SEED)),
            "semantic_lm": {"crops": len(lm_crops), **stream_statistics(lm_semantic, vocab),
                            **lm_quality(SemanticLMTask(lm_config), melody.lm_params, mulan_tokens, lm_semantic,
                                         caption_tokens, seed, batch_size)},
            "dpd": {"crops": len(dpd_crops), **dpd_quality(
                DPDTask(dpd_config), melody.dpd_params, _rows(melody.vae.encode, dpd_crops, batch_size),
                _rows(melody.tokenizer, dpd_crops, batch_size), seed, batch_size)},
        }
    return table


def markdown(table: Mapping[str, Any]) -> str:
    """The table as Markdown: each stage's measures, with what each is to be read against."""
    f = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    n, v, lm, dpd = table["clips"], table["vae_gan"], table["semantic_lm"], table["dpd"]
    lines = [f"{n} held-out clips of {table['seconds']:g} s; LM and DPD on {lm['crops']} / {dpd['crops']} crops "
             "cut like their training records.", "",
             "| stage | measure | value | read against |", "|---|---|---|---|",
             f"| VAE-GAN | MR-STFT distance | {f(v['mr_stft'])} | 0 = identical |",
             f"| VAE-GAN | log-mel L1 | {f(v['log_mel_l1'])} | 0 = identical |",
             f"| VAE-GAN | SI-SNR (dB) | {f(v['si_snr_db'])} | higher is better |"]
    for name, p in table["tokens"].items():
        against = ("no attributes, or < 2 classes of ≥ 4 clips" if p is None else
                   f"majority {f(p['majority'])} ({p['clips']} clips, {p['classes']} classes)")
        lines.append(f"| tokens | {name} probe accuracy | {f(p and p['accuracy'])} | {against} |")
    lines.append(f"| tokens | onset envelope R² (the beat; ridge on tokens t ± {BEAT_CONTEXT}) | "
                 f"{f(table['beat_r2'])} | 1 = every onset marked, ≤ 0 = none |")
    t, chain = table["tempo"], table["chain"]
    if t is not None:
        lines += [f"| tokens | tempo accuracy (±5 %) read from the clips' tokens (no DPD) | {f(t['tokens'])} | the "
                  f"clips {f(chain['clips']['tempo'])} |",
                  f"| semantic LM | tempo accuracy (±5 %) of its {CONTINUATION_SECONDS:g}-s continuations of the clips' "
                  f"first halves, read from tokens | {f(t['lm_continuation'])} | the clips' tokens {f(t['tokens'])}; the best "
                  f"one tempo for all {f(t['one_tempo'])} |"]
    for key, r in table["mulan"].items():
        k = int(key.split("@")[1])
        lines.append(f"| MuLan | text → audio {key} | {f(r)} | chance {f(min(1.0, k / n))} |")
    for name, p in table["mulan_text"].items():
        which = "captions naming it" if name in NAMED else "captions"
        against = ("< 2 classes of ≥ 4 captions" if p is None else
                   f"majority {f(p['majority'])} ({p['clips']} {which})")
        lines.append(f"| MuLan | {name} probe accuracy on text embeddings of synthetic captions | "
                     f"{f(p and p['accuracy'])} | {against} |")
    lines += [f"| semantic LM | held-out cross-entropy (nats/token) | {f(lm['loss'])} | unigram entropy "
              f"{f(lm['entropy_nats'])} |",
              f"| semantic LM | held-out cross-entropy, prefixes shuffled across crops | "
              f"{f(lm['loss_shuffled_prefix'])} | true prefixes {f(lm['loss'])} (as low: the prefix is ignored) |",
              f"| semantic LM | held-out cross-entropy, the captions' text tokens as prefix (as sampled) | "
              f"{f(lm['loss_caption_prefix'])} | audio tokens' {f(lm['loss'])} |",
              f"| semantic LM | held-out next-token accuracy | {f(lm['accuracy'])} | repeat rate "
              f"{f(lm['repeat_rate'])} |",
              f"| semantic LM | share of the vocabulary in the held-out stream | {f(lm['distinct_fraction'])} | "
              "1 = every token used |"]
    for measure, key in (("velocity MSE at π/4", "velocity_mse_quarter_pi"), ("SI-SNRi at π/4 (dB)",
                                                                               "si_snri_db_quarter_pi")):
        lines.append(f"| DPD | {measure}, true tokens | {f(dpd['true'][key])} | shuffled tokens "
                     f"{f(dpd['shuffled'][key])} |")
    if chain is not None:
        lines += ["", "Down the chain: the evaluation's checks, each source against its clip's own attributes "
                  "(instrument: nearest centroid on the clips' musicnn embeddings without the clip it came from); "
                  "musicnn FAD of the source's first half of the clips against the clips' second half.", "",
                  "| audio | tempo | key | drums | instrument | musicnn FAD |", "|---|---|---|---|---|---|"]
        lines += [f"| {CHAIN[name]} | {f(c['tempo'])} | {f(c['key'])} | {f(c['drums'])} | {f(c['instrument'])} | "
                  f"{f(c['fad_musicnn'])}{' (the floor)' if name == 'clips' else ''} |" for name, c in chain.items()]
    return "\n".join(lines) + "\n"
