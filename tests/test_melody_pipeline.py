"""End-to-end MeLoDy sampling on a bundle of tiny untrained stages (DESIGN §1, §4.6, §7).

Checked: output lengths (10 s directly, 25 s by continuation windows), continuation and inpainting
keep the known latents bit for bit, inpainting runs the DPD window by window and draws the span's
semantic tokens with the right context weighing in, a batch equals its rows sampled one by one, and bundles whose
parts do not fit are refused with a message naming the mismatch. Tiny DPD window: 16 tokens
(0.64 s), so 10 s already needs 59 continuation windows.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import numpy as np
import pytest

from melody_jax.pipelines.bundle import check_fit, read_configs
from melody_jax.pipelines.dpd_sampling import inpaint_plan
from melody_jax.pipelines.generation import AudioInputError
from melody_jax.pipelines import melody as melody_module
from melody_jax.pipelines.melody import MeLoDy, fold, row_keys
from melody_jax.pipelines.validation import DurationError, PromptError
from melody_jax.training.errors import BundleError, UserError
from melody_jax.training.sharding import activate
from tests.bundle_fixture import build_bundle, tiny_configs
from tests.helpers import run_cli

# The bundles are untrained; the file's time is sampling and compiling in the tests (about 5 min alone on
# 2 cores, up to ~12 min under a full suite's load): the limit is a hang guard at over twice that.
pytestmark = [pytest.mark.timeout(1800), pytest.mark.slow]

RATE = 24000


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> str:
    return build_bundle(str(tmp_path_factory.mktemp("stages")))


@pytest.fixture(scope="module")
def melody(bundle) -> MeLoDy:
    return MeLoDy(bundle, progress=False)


def test_lengths_of_direct_and_continued_generation(melody):
    short = melody.generate(["solo piano, slow"], 0.4, steps=2, seed=0)  # inside one DPD window
    assert short.audio.shape == (1, int(0.4 * RATE))
    assert short.semantic_tokens.shape == (1, 10) and short.latents.shape == (1, 100, 16)
    ten = melody.generate(["drums and bass, fast"], 10.0, steps=2, seed=0)
    assert ten.audio.shape == (1, 240000) and np.isfinite(ten.audio).all()
    assert ten.latents.shape[1] >= 2500 and ten.semantic_tokens.shape[1] >= 250
    assert np.abs(ten.latents).max() <= 1.0
    longer = melody.generate(["drums and bass, fast"], 25.0, steps=2, seed=0)
    assert longer.audio.shape == (1, 600000)
    windows = (longer.semantic_tokens.shape[1] - melody.window_tokens) // melody.chunk_tokens
    assert longer.forward_passes["dpd"] == 2 * (1 + windows) and windows >= (625 - 16) // 4


def test_tokens_render_into_the_audio_their_generation_made(melody):
    """generate_from_tokens runs the same DPD windows with the same keys as generate: a result's own tokens
    with its seed give back its audio; tokens past the last whole continuation chunk are dropped."""
    made = melody.generate(["strings", "drums"], 1.2, steps=2, seed=5)  # 30 tokens asked: a window + 4 chunks
    assert made.semantic_tokens.shape == (2, 32) and made.audio.shape == (2, 30 * 960)
    again = melody.generate_from_tokens(made.semantic_tokens, steps=2, seed=5)
    assert again.forward_passes["dpd"] == 2 * (1 + 4) and again.forward_passes["semantic_lm"] == 0
    np.testing.assert_allclose(again.audio[:, : 30 * 960], made.audio, atol=1e-5)
    cut = melody.generate_from_tokens(made.semantic_tokens[:, :30], steps=2, seed=5)  # a chunk and a half
    assert cut.semantic_tokens.shape == (2, 28) and cut.audio.shape == (2, 28 * 960)
    short = melody.generate_from_tokens(made.semantic_tokens[:, :10], steps=2, seed=5)
    assert short.audio.shape == (2, 10 * 960)
    for bad in (made.semantic_tokens[0], made.semantic_tokens + 32, made.semantic_tokens * 0.5):
        with pytest.raises(AudioInputError, match="need semantic tokens int"):
            melody.generate_from_tokens(bad)


def test_uniform_schedule_is_a_choice(bundle, melody):
    """The paper's ablation schedule: same tokens (the LM does not see it), other latents."""
    assert melody.defaults["schedule"] == "paper"  # the bundle's dpd config: sample.schedule
    uniform = MeLoDy(bundle, progress=False, schedule="uniform")
    paper, flat = (m.generate(["strings"], 0.4, steps=2, seed=0) for m in (melody, uniform))
    np.testing.assert_array_equal(paper.semantic_tokens, flat.semantic_tokens)
    assert np.abs(paper.latents - flat.latents).mean() > 1e-3
    with pytest.raises(UserError, match="schedule must be one of"):
        MeLoDy(bundle, schedule="cosine")


def test_an_lm_window_longer_than_the_dpd_window_sets_the_lm_context(bundle, tmp_path, monkeypatch):
    """An LM trained on longer crops than the DPD's window (the demo's: 48 tokens against 16) continues with its
    last lm_window − M_ST tokens, not the DPD's window − M_ST: each LM step of a 4-s generation after the first
    40 tokens sees 36 of them, while the DPD keeps its 16-token windows."""
    from benchmarks.untrained import init_workdir
    from melody_jax.pipelines.bundle import assemble
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    stages = os.path.dirname(bundle)
    init_workdir(tiny_configs(semantic_lm={"data.semantic_len": 40})["semantic_lm"], str(tmp_path / "semantic_lm"))
    dirs = {s: str(tmp_path / s) if s == "semantic_lm" else os.path.join(stages, s) for s in read_configs(bundle)}
    assemble(str(tmp_path / "bundle"), dirs, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    long_lm = MeLoDy(str(tmp_path / "bundle"), progress=False)
    assert (long_lm.lm_window, long_lm.window_tokens, long_lm.chunk_tokens, long_lm.lm_context) == (40, 16, 4, 36)
    seen = []
    real = melody_module.continue_windows

    def spy(model, params, prefix, context, *args, **kwargs):
        seen.append((context.shape[1], args[1]))  # (context tokens, windows)
        return real(model, params, prefix, context, *args, **kwargs)

    monkeypatch.setattr(melody_module, "continue_windows", spy)
    out = long_lm.generate(["calm piano"], 4.0, steps=2, seed=0)
    assert out.audio.shape == (1, 4 * RATE) and out.semantic_tokens.shape == (1, 100)
    assert seen == [(36, 15)]  # 40 tokens from scratch, then (100 − 40) / 4 steps on the last 36


def test_lm_guidance_contrasts_the_prompt_with_the_null_prefix(bundle, tmp_path, monkeypatch):
    """An LM trained with prefix dropout has a null prefix: lm_cfg ≠ 1 hands every LM call (the first window
    and the scanned continuation windows) the null prefix beside the prompt's, with its scale; lm_cfg 1 runs the
    unguided sampler. (The sampler's guided draws are checked against full forwards in test_semantic_lm.)"""
    from benchmarks.untrained import init_workdir
    from melody_jax.models.semantic_lm import NULL_CODE
    from melody_jax.pipelines.bundle import assemble
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    stages = os.path.dirname(bundle)
    init_workdir(tiny_configs(semantic_lm={"model.cfg_dropout": 0.2})["semantic_lm"], str(tmp_path / "semantic_lm"))
    dirs = {s: str(tmp_path / s) if s == "semantic_lm" else os.path.join(stages, s) for s in read_configs(bundle)}
    assemble(str(tmp_path / "bundle"), dirs, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES)
    guided = MeLoDy(str(tmp_path / "bundle"), progress=False)
    assert guided.lm.null_prefix and guided.defaults["lm_cfg"] == 1.0
    seen = []
    for name in ("sample", "continue_windows"):
        def spy(*args, real=getattr(melody_module, name), name=name, **kwargs):
            null = kwargs.get("null_prefix")
            seen.append((name, None if null is None else np.unique(null).tolist(), kwargs.get("cfg_scale")))
            return real(*args, **kwargs)

        monkeypatch.setattr(melody_module, name, spy)
    out = guided.generate(["calm piano"], 1.0, steps=2, seed=0, lm_cfg=3.0)
    assert seen == [("sample", [NULL_CODE], 3.0), ("continue_windows", [NULL_CODE], 3.0)]
    seen.clear()
    plain = guided.generate(["calm piano"], 1.0, steps=2, seed=0)
    assert seen == [("sample", None, None), ("continue_windows", None, None)]
    assert (out.semantic_tokens != plain.semantic_tokens).any()


def test_continuation_keeps_the_given_latents(melody):
    audio = np.asarray(melody.generate(["strings"], 1.2, steps=2, seed=3).audio)
    known = melody.vae.encode(audio[:, : audio.shape[1] // 960 * 960])
    out = melody.generate_continuation(audio, 1.0, ["strings"], steps=2, seed=4)
    assert out.audio.shape == (1, (30 * 960) + RATE)  # 1.2 s → 30 whole tokens, plus 1 s
    np.testing.assert_array_equal(out.latents[:, : known.shape[1]], np.asarray(known))
    assert not np.allclose(out.latents[:, known.shape[1]:], 0)
    prompted = melody.generate_continuation(audio, 0.5, None, steps=2, seed=4)  # prompt from the audio itself
    np.testing.assert_array_equal(prompted.latents[:, : known.shape[1]], np.asarray(known))
    # The LM alone samples the very tokens the continuation rendered (same seed, same prefix and context).
    new = prompted.semantic_tokens[:, 30:]
    np.testing.assert_array_equal(melody.continue_tokens(audio, new.shape[1], seed=4), new)
    with pytest.raises(UserError, match="num_tokens must be >= 1"):
        melody.continue_tokens(audio, 0)


def test_a_short_prompt_is_seen_whole(melody, monkeypatch):
    """A prompt of fewer tokens than the LM's context is all context: 8 tokens with a 12-token context are seen
    whole (a negative slice start once wrapped them to their last 4), and each later window sees the last 12."""
    audio = np.asarray(melody.generate(["strings"], 0.32, steps=2, seed=3).audio)
    assert melody.lm_context == 12 and audio.shape[1] == 8 * 960
    seen = []
    real = melody_module.continue_tokens

    def spy(model, params, prefix, context, *args, **kwargs):
        seen.append(context.shape[1])
        return real(model, params, prefix, context, *args, **kwargs)

    monkeypatch.setattr(melody_module, "continue_tokens", spy)
    melody.continue_tokens(audio, 6, seed=4)
    assert seen == [8, 12]  # 4 tokens on the 8 given, then 2 on the last 12


def test_inpainting_changes_only_the_span(melody):
    audio = np.asarray(melody.generate(["flute", "guitar"], 1.6, steps=2, seed=1).audio)
    before = np.asarray(melody.vae.encode(audio))
    out = melody.inpaint(audio, 0.4, 0.8, ["flute", "guitar"], steps=2, seed=2)
    frames = np.arange(before.shape[1])
    inside = (frames >= 100) & (frames < 200)  # 0.4–0.8 s at 250 Hz
    np.testing.assert_array_equal(out.latents[:, ~inside], before[:, ~inside])
    assert np.abs(out.latents[:, inside] - before[:, inside]).mean() > 1e-3
    assert out.audio.shape == audio.shape


def test_long_span_is_inpainted_window_by_window(melody):
    audio = np.random.default_rng(2).uniform(-0.3, 0.3, (1, int(1.6 * RATE))).astype(np.float32)  # 40 tokens
    before = np.asarray(melody.vae.encode(audio))
    out = melody.inpaint(audio, 0.2, 1.2, ["flute"], steps=2, seed=2, inpaint_candidates=2)
    plan = inpaint_plan(40, 5, 30, melody.window_tokens, melody.chunk_tokens)
    assert melody.window_tokens == 16 and plan.tolist() == [[0, 5, 16], [15, 16, 30]]
    assert out.forward_passes["dpd"] == 2 * len(plan)
    assert out.audio.shape == audio.shape and out.latents.shape == before.shape
    inside = (np.arange(before.shape[1]) >= 50) & (np.arange(before.shape[1]) < 300)  # 0.2–1.2 s at 250 Hz
    np.testing.assert_array_equal(out.latents[:, ~inside], before[:, ~inside])
    assert np.abs(out.latents[:, inside] - before[:, inside]).mean() > 1e-3


def test_span_tokens_are_resampled_by_the_right_context(melody):
    """The hand computation: the same candidates the LM draws after the left context, weighted by the
    full forward's log p(right | prefix, left, span), one drawn per row by Gumbel-max with the row's key."""
    batch, count, num_new = 6, 4, 5
    rng = np.random.default_rng(4)
    vocab = melody.lm.vocab_size
    left, right = rng.integers(0, vocab, (batch, 9)), rng.integers(0, vocab, (batch, melody.chunk_tokens))
    keys = row_keys(11, batch)
    s = {**melody.defaults, "inpaint_candidates": count}
    context = left[:, -melody.lm_context:]
    with activate(melody.mesh, melody.rules):
        prefix = melody.mulan.text_tokens(["calm strings"] * batch)
        got = np.asarray(melody._span_tokens(prefix, left, right, num_new, keys, s))
        spans = [np.asarray(melody._lm(prefix, context, num_new, fold(fold(keys, 1), c), s)) for c in range(count)]
        left_only = melody._span_tokens(prefix, left, right, num_new, keys, {**s, "inpaint_candidates": 1})
        np.testing.assert_array_equal(left_only, melody._lm(prefix, context, num_new, fold(keys, 1), s))
    assert got.shape == (batch, num_new)
    weights = np.zeros((batch, count))
    for c, span in enumerate(spans):
        stream = np.concatenate([np.asarray(prefix), np.concatenate([left, span], 1)[:, -melody.lm_context:], right], 1)
        logp = jax.nn.log_softmax(melody.lm.apply({"params": melody.lm_params}, stream[:, :-1]), -1)
        tail = np.asarray(logp)[:, -right.shape[1]:]
        weights[:, c] = np.take_along_axis(tail, right[..., None], -1)[..., 0].sum(1)
    gumbel = np.asarray(jax.vmap(lambda k: jax.random.gumbel(k, (count,)))(fold(keys, 3)))
    chosen = np.argmax(weights + gumbel, axis=1)
    np.testing.assert_array_equal(got, np.stack([spans[c][b] for b, c in enumerate(chosen)]))
    # the right context decides: without its weights the draw would differ for some rows
    assert (chosen != np.argmax(gumbel, axis=1)).any(), (weights, gumbel)


def test_batch_equals_rows_one_by_one(melody):
    prompts = ["violin, sad", "synth, happy, fast"]
    batch = melody.generate(prompts, 1.0, steps=2, seed=7)
    for i, prompt in enumerate(prompts):
        alone = melody.generate([prompt], 1.0, steps=2, seed=7 + i)
        np.testing.assert_array_equal(alone.semantic_tokens[0], batch.semantic_tokens[i])
        np.testing.assert_allclose(alone.audio[0], batch.audio[i], atol=1e-5)
    again = melody.generate(prompts, 1.0, steps=2, seed=7)
    np.testing.assert_array_equal(again.audio, batch.audio)


def test_bad_requests_get_one_line_errors(melody):
    with pytest.raises(DurationError, match="must be > 0"):
        melody.generate(["x"], 0.0)
    with pytest.raises(DurationError, match="longer than the maximum"):
        melody.generate(["x"], 1e9)
    with pytest.raises(PromptError, match="characters; the maximum"):
        melody.generate(["x" * 10_000], 1.0)
    with pytest.raises(AudioInputError, match="inpainting span"):
        melody.inpaint(np.zeros(RATE, np.float32), 0.8, 0.2)
    with pytest.raises(AudioInputError, match="NaN"):
        melody.generate_continuation(np.full(RATE, np.nan, np.float32), 1.0)
    with pytest.raises(AudioInputError, match=r"^lm_cfg=2.0 needs a semantic LM trained with model.cfg_dropout > 0; "
                                              r"this bundle's has no null prefix \(use lm_cfg=1\)$"):
        melody.generate(["x"], 1.0, lm_cfg=2.0)


def test_mismatched_bundles_are_refused(bundle, tmp_path):
    configs = read_configs(bundle)
    check_fit(configs)
    cases = [({"dpd": {"model.vocab_size": 64}}, "k-means has 32 clusters.*dpd of 64"),
             ({"dpd": {"model.latent_dim": 8}}, "16 channels, dpd expects 8"),
             ({"semantic_lm": {"model.num_mulan_tokens": 8}}, "rvq has 12 levels"),
             ({"mulan": {"data.sample_rate": 16000}}, "mulan works at 16000 Hz"),
             ({"dpd": {"data.token_length": 32}}, "5 latent frames per token")]
    for changes, message in cases:
        with pytest.raises(BundleError, match=message):
            check_fit(tiny_configs(**changes))
    partial = {k: v for k, v in configs.items() if k != "ssl"}
    with pytest.raises(BundleError, match="lacks the stage"):
        check_fit(partial)
    with pytest.raises(BundleError, match="is not a bundle"):
        MeLoDy(str(tmp_path))


def test_sample_cli_writes_wavs_and_spectrograms(bundle, tmp_path):
    out = str(tmp_path / "song.wav")
    proc = run_cli("launch.sample", f"--bundle={bundle}", "--prompt=piano", "--prompt=drums", "--duration=1",
                   "--steps=2", "--schedule=uniform", f"--out={out}", "--no_progress", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import soundfile as sf

    for i in range(2):
        audio, rate = sf.read(str(tmp_path / f"song_{i}.wav"))
        assert rate == RATE and audio.shape == (RATE,)
        assert os.path.getsize(tmp_path / f"song_{i}.png") > 1000
    assert "real-time factor" in proc.stdout and "semantic_lm" in proc.stdout
    bad = run_cli("launch.sample", f"--bundle={bundle}", "--prompt=x", "--duration=-1", timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --duration")


def test_evaluation_scores_generated_audio_beside_the_reference(melody, prepared_data):
    """Untrained stages make noise: on the independent musicnn embeddings it must sit further from the
    reference than half of the reference sits from the other half."""
    from data_pipeline.builder import PrepareError, read_clips
    from melody_jax.evaluation.generation import evaluate, markdown, read_prompts

    data = prepared_data(source="synthetic", num_clips=8, clip_seconds=4.0, sample_rate=RATE, seed=5)
    reference = read_clips(data, "train", RATE)
    report = evaluate(melody, read_prompts("synthetic:4"), reference, duration_s=3.0, steps=2, batch_size=2)
    fad = report["fad_musicnn"]
    assert fad["patches_generated"] == 4 and fad["generated"] > 2 * fad["reference_halves"] > 0, fad
    assert np.isfinite(report["fad_mulan"]["generated"]) and -1 <= report["mcc"]["generated"] <= 1
    attrs = report["attributes"]
    assert attrs["checked_prompts"] == 4 and attrs["checked_reference"] == len(reference)
    assert attrs["reference"]["drums"] >= 0.75 and set(attrs["generated"]) == {"tempo", "key", "drums", "instrument"}
    assert "| FAD, musicnn embeddings" in markdown(report)
    with pytest.raises(PrepareError, match="prepared at 24000 Hz, not the model's 16000 Hz"):
        read_clips(data, "train", 16000)
    with pytest.raises(PrepareError, match="has no split 'test'"):
        read_clips(data, "test")


@dataclasses.dataclass
class IdentityVAE:
    """What `vae_quality` reads of a FrozenVAE, reconstructing exactly: latents are the samples, hop per frame."""
    config: Any
    hop: int
    sample_rate: int

    def encode(self, audio: np.ndarray) -> np.ndarray:
        return np.asarray(audio).reshape(len(audio), -1, self.hop)

    def decode(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z).reshape(len(z), -1)


def test_stage_quality_table_reads_each_stage(melody, prepared_data):
    """The per-stage table on the untrained chain, each figure against a reference: the untrained VAE-GAN
    reconstructs far below an identity stand-in through the same measure, MuLan's recall is the retrieval
    measure's on the same embeddings, the collapsed token stream of an untrained tokenizer reads as one,
    and the DPD's and the LM's numbers move when their tokens (the LM's prefix) are shuffled unless their
    token tables are zeroed."""
    from data_pipeline.builder import read_clips
    from melody_jax.evaluation.stage_quality import (dpd_quality, lm_quality, markdown, retrieval_recall,
                                                     stage_quality, vae_quality)
    from melody_jax.tasks.dpd import DPDTask
    from melody_jax.tasks.semantic_lm import SemanticLMTask

    data = prepared_data(source="synthetic", num_clips=8, clip_seconds=4.0, sample_rate=RATE, seed=5)
    clips = [{**c, "audio": c["audio"][: 48 * 960]} for c in read_clips(data, "train", RATE)]  # 3 crops of 16 tokens
    stages = stage_quality(melody, clips)
    v = stages["vae_gan"]
    with activate(melody.mesh, melody.rules):
        audio = np.stack([c["audio"] for c in clips])
        perfect = vae_quality(IdentityVAE(melody.vae.config, melody.vae.hop, RATE), audio)
        # Measured: untrained −45 dB SI-SNR; identity > 100 dB with both distances 0.
        assert perfect["si_snr_db"] > 80 and perfect["mr_stft"] < 1e-6 and perfect["log_mel_l1"] < 1e-6, perfect
        assert v["si_snr_db"] < 0 and v["mr_stft"] > 0.1 and v["log_mel_l1"] > 0.1, v
        text = melody.mulan.text_embeddings([c["caption"] for c in clips])
        recall = retrieval_recall(np.asarray(text), np.asarray(melody.mulan.audio_embeddings(audio)))
    assert stages["mulan"] == {"recall@1": recall[1], "recall@5": recall[5]} and recall[5] >= recall[1]
    # what the text tower keeps of a caption: the token probes on text embeddings of 256 synthetic captions
    # (the key over the 125 that name theirs, drums over the 229 that say whether they play), whatever the tower
    text = stages["mulan_text"]
    assert set(text) == set(stages["tokens"]) and text["key (tonic)"]["clips"] == 125 and text["lead"]["clips"] == 256
    assert text["drums"]["clips"] == 229
    lm, dpd = stages["semantic_lm"], stages["dpd"]
    # The untrained SSL tower + k-means put every frame in one cluster: the table reads a collapsed stream
    # (one token of 32, each repeating its predecessor), the untrained LM's loss stays near log 32 = 3.47
    # (measured 3.33) far above that stream's entropy, and shuffling a constant stream changes nothing.
    assert lm["crops"] == dpd["crops"] == 24
    assert lm["entropy_nats"] == 0 and lm["distinct_fraction"] == 1 / 32 and lm["repeat_rate"] == 1, lm
    assert lm["loss"] == pytest.approx(np.log(32), abs=0.3) and lm["accuracy"] == 0, lm
    assert np.isfinite([lm["loss_shuffled_prefix"], lm["loss_caption_prefix"]]).all(), lm
    assert dpd["true"] == dpd["shuffled"]
    assert all(p is None for p in stages["tokens"].values())  # 8 clips: no two classes of ≥ 4 (n/a, not a guess)
    # One token for every frame marks no onset, and the untrained DPD renders no beat. Measured on these 1.92-s
    # clips: tempo from the clips 0.5, from the untrained VAE-GAN's reconstructions 0.375 (its random convs pass
    # the loudness envelope the beat tracker reads), from the rendered tokens 0.
    t, chain = stages["tempo"], stages["chain"]
    assert list(chain) == ["clips", "vae_gan", "dpd", "audio_prompt", "text"]
    assert stages["beat_r2"] <= 0 and chain["clips"]["tempo"] >= 0.5 and chain["dpd"]["tempo"] == 0, (stages, chain)
    assert chain["vae_gan"]["tempo"] <= chain["clips"]["tempo"], chain
    # Down the chain, the evaluation's other checks and its FAD. Measured: the clips' key 0.875 and drums 1.0, the
    # untrained stages' audio key 0 and drums 0.125 (none reads as drums), and musicnn FAD 68–81 from the untrained
    # stages against the clips' own halves' 33 (4 clips a half).
    assert chain["clips"]["key"] >= 0.75 and chain["clips"]["drums"] == 1.0, chain
    for name in ("vae_gan", "dpd", "audio_prompt", "text"):
        assert chain[name]["key"] < 0.5 and chain[name]["fad_musicnn"] > chain["clips"]["fad_musicnn"] + 10, chain
    # Read from tokens, the collapsed stream and the untrained LM's continuations (read by a regression fitted
    # on that one token) give a flat envelope: no clip's tempo.
    assert t["tokens"] == 0 and t["lm_continuation"] == 0 and t["one_tempo"] >= 1 / len(clips), t

    task, rng = DPDTask(melody.configs["dpd"]), np.random.default_rng(0)
    latents = rng.uniform(-1, 1, (8, 160, 16)).astype(np.float32)
    tokens = rng.integers(0, 32, (8, 16)).astype(np.int32)
    blind = {**melody.dpd_params, "token_embed": np.zeros_like(melody.dpd_params["token_embed"])}
    with activate(melody.mesh, melody.rules):
        used, ignored = (dpd_quality(task, p, latents, tokens) for p in (melody.dpd_params, blind))
    assert used["true"] != used["shuffled"] and ignored["true"] == ignored["shuffled"], (used, ignored)
    # The LM's prefix: shuffling random MuLan tokens across crops moves its loss, unless the prefix's embedding
    # rows are zeroed; the caption prefix is read like any other.
    lm_task, q = SemanticLMTask(melody.configs["semantic_lm"]), melody.configs["semantic_lm"].model
    mulan, semantic = rng.integers(0, 16, (8, 12)), rng.integers(0, 32, (8, 16))
    embedding = melody.lm_params["decoder"]["embedding"]
    deaf = {**melody.lm_params, "decoder": {**melody.lm_params["decoder"], "embedding": embedding.at[
        : q.num_mulan_tokens * q.mulan_codebook_size].set(0.0)}}
    with activate(melody.mesh, melody.rules):
        heard, unheard = (lm_quality(lm_task, p, mulan, semantic, caption_tokens=mulan[::-1])
                          for p in (melody.lm_params, deaf))
    assert heard["loss"] != heard["loss_shuffled_prefix"] and heard["loss"] != heard["loss_caption_prefix"], heard
    assert unheard["loss"] == unheard["loss_shuffled_prefix"] == unheard["loss_caption_prefix"], unheard
    md = markdown(stages)
    assert "| DPD | velocity MSE at π/4, true tokens |" in md and "| MuLan | text → audio recall@5 |" in md
    assert "| MuLan | key (tonic) probe accuracy on text embeddings of synthetic captions |" in md
    assert "| tokens | tempo accuracy (±5 %) read from the clips' tokens (no DPD) |" in md
    assert "| DPD renders of the clips' tokens | 0.000 |" in md and "| the clips |" in md
    assert "| semantic LM | tempo accuracy (±5 %) of its 8-s continuations of the clips' first halves" in md
    assert "| semantic LM | held-out cross-entropy, prefixes shuffled across crops |" in md


@pytest.fixture(scope="module")
def musicgen_bundle(tmp_path_factory) -> str:
    from tests.bundle_fixture import build_musicgen_bundle

    return build_musicgen_bundle(str(tmp_path_factory.mktemp("musicgen")))


def test_musicgen_path_makes_the_same_durations_from_the_same_prompts(melody, musicgen_bundle):
    from melody_jax.pipelines.musicgen import MusicGen

    musicgen = MusicGen(musicgen_bundle)
    prompts = ["solo piano, slow", "drums and bass, fast"]
    for seconds in (0.1, 1.3):  # 5 frames: fewer than the 8 a window keeps; 65 frames: seven sliding windows
        ours, theirs = melody.generate(prompts, seconds, steps=2), musicgen.generate(prompts, seconds)
        assert ours.audio.shape[1] / ours.sample_rate == theirs.audio.shape[1] / theirs.sample_rate == seconds
        assert theirs.audio.shape == (2, int(seconds * 32000)) and np.isfinite(theirs.audio).all()
        frames = math.ceil(seconds * 50)
        assert theirs.codes.shape == (2, 4, frames) and theirs.codes.max() < 64
    assert theirs.forward_passes["musicgen_lm"] > frames  # one decoder call per pattern step, windows included
    # the melody reaches the model: same seed, different chromagram, different codes
    t = np.arange(16000) / 32000
    a = musicgen.generate(prompts[:1], 0.5, seed=3, melody=np.sin(2 * np.pi * 261.6 * t).astype(np.float32))
    b = musicgen.generate(prompts[:1], 0.5, seed=3, melody=np.sin(2 * np.pi * 392.0 * t).astype(np.float32))
    assert a.codes.shape == b.codes.shape and (a.codes != b.codes).any()
    with pytest.raises(AudioInputError, match="at least one codec frame"):
        musicgen.generate(prompts[:1], 1.0, melody=np.zeros(10, np.float32))


def test_musicgen_sample_cli_and_bundle_checks(musicgen_bundle, tmp_path):
    import json

    import soundfile as sf

    from melody_jax.pipelines.bundle import MUSICGEN_STAGES, assemble
    from melody_jax.training.sharding import DEFAULT_RULES, make_mesh

    melody_wav = str(tmp_path / "melody.wav")
    sf.write(melody_wav, 0.5 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000), 16000)
    proc = run_cli("launch.sample", f"--bundle={musicgen_bundle}", "--prompt=piano",
                   "--duration=0.5", f"--melody={melody_wav}", "--two_step_cfg", "--cfg_beta=2",
                   f"--out={tmp_path / 'mg.wav'}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    audio, rate = sf.read(str(tmp_path / "mg.wav"))
    assert rate == 32000 and audio.shape == (16000,) and "musicgen_lm" in proc.stdout
    # the fixture's codec workdir beside an LM workdir whose config.json asks for 128 codes: refused from the
    # configs, before anything is written (building such a bundle would initialise both stages: ~20 CPU-s)
    stages = os.path.dirname(musicgen_bundle)
    with open(os.path.join(stages, "musicgen", "config.json")) as f:
        config = json.load(f)
    config["model"]["codebook_size"] = 128
    (tmp_path / "musicgen").mkdir()
    (tmp_path / "musicgen" / "config.json").write_text(json.dumps(config))
    sources = {"codec": os.path.join(stages, "codec"), "musicgen": str(tmp_path / "musicgen")}
    with pytest.raises(BundleError, match="codec has 4 codebooks of 64 codes, musicgen models 4 of 128"):
        assemble(str(tmp_path / "bad"), sources, make_mesh({"data": 1}, jax.devices()[:1]), DEFAULT_RULES,
                 MUSICGEN_STAGES)
    assert not os.path.exists(tmp_path / "bad")


def test_sampling_benchmark_rows(melody, musicgen_bundle):
    """benchmarks.sampling.measure on the tiny bundles: the fields its table and JSON carry."""
    from benchmarks import forward_passes as fp
    from benchmarks.sampling import COLUMNS, PROMPTS, measure
    from melody_jax.pipelines.musicgen import MusicGen

    ours = measure("melody", melody, 1.3, 1_000, repeats=1)
    theirs = measure("musicgen", MusicGen(musicgen_bundle), 1.3, 2_000, repeats=1)
    for row in (ours, theirs):
        assert set(COLUMNS) - {"preset", "time_ratio", "passes_ratio"} <= set(row)
        assert row["wall_s"] > 0 and row["realtime_x"] == pytest.approx(len(PROMPTS) * 1.3 / row["wall_s"])
    assert theirs["params_m"] == 0.002 and "musicgen_lm" in theirs["stage_s"]
    # the sampler's own count agrees with the forward-pass model: 65 frames in windows of 16 keeping 8
    assert theirs["forward_passes"] == fp.musicgen_passes(1.3, window_s=16 / 50, keep_s=8 / 50)["total"]
