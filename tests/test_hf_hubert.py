"""HuBERT/MERT as the frozen semantic tokenizer: a converted transformers `HubertModel` gives transformers'
hidden states (every layer, a padded batch with its attention mask and an unpadded clip), the converter
reads MERT's config and refuses what it cannot compute in one line, the JAX resampler matches soxr, and
the converted tower feeds the kmeans stage and issue 5's token probe end to end (fixtures:
tests/fixtures/hf/hubert*, made by benchmarks/peers/fixtures_hubert.py)."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soxr

from data_pipeline.builder import read_clips
from data_pipeline.captions import tempo_band
from launch.convert import convert
from melody_jax.audio.resample import resample
from melody_jax.convert.checkpoint_dir import ConversionError, read_checkpoint
from melody_jax.convert.hf_hubert import hubert_from_hf
from melody_jax.frozen.semantic import SemanticTokenizer
from melody_jax.frozen.stage_models import hubert_model
from melody_jax.tasks.registry import get_task
from melody_jax.tasks.ssl import SSLTask
from melody_jax.training.errors import ConfigError
from melody_jax.training.loop import train
from tests.helpers import run_cli, stage_config
from melody_jax.evaluation.token_probe import probe_accuracy
from tests.test_ssl_stage import PROBE_CLUSTERS

FIXTURES = "tests/fixtures/hf"
SR = 24000


def _golden(variant: str) -> dict[str, np.ndarray]:
    return dict(np.load(f"{FIXTURES}/{variant}/golden.npz", allow_pickle=False))


@pytest.mark.parametrize("variant", ["hubert", "hubert-stable"])
def test_converted_hubert_gives_transformers_hidden_states(variant):
    """Every hidden state (after the positional conv, then each block) within 1e-4 of transformers',
    for a padded batch with its attention mask (every frame, padded ones too) and an unpadded clip."""
    converted = hubert_from_hf(read_checkpoint(f"{FIXTURES}/{variant}"))
    model, golden = hubert_model(converted.config), _golden(variant)
    assert converted.config.model.model_rate == 16000 and converted.config.model.token_hop == 960
    with jax.default_matmul_precision("highest"):
        run = jax.jit(lambda p, a, m: model.apply({"params": p}, a, m))
        states, valid = run(converted.params, golden["audio"], golden["mask"])
        single, _ = run(converted.params, golden["single_audio"], None)
    assert np.asarray(valid).sum(1).tolist() == [24, 15]  # (5111 − 400) // 320 + 1 frames of the padded clip
    for ours, want in ((states, golden["states"]), (single, golden["single_states"])):
        ours = np.stack([np.asarray(s) for s in ours])
        assert ours.shape == want.shape, (ours.shape, want.shape)
        err = np.abs(ours - want).max(axis=(1, 2, 3))
        print(f"{variant}: max |ours − transformers| per layer {np.array2string(err, precision=1)}")
        assert err.max() < 1e-4, err


def _edited(tmp_path, edit) -> str:
    out = tmp_path / "edited"
    shutil.copytree(f"{FIXTURES}/hubert", out)
    config = json.loads((out / "config.json").read_text())
    edit(config)
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def test_mert_config_maps_and_unsupported_variants_are_refused(tmp_path):
    mert = {"model_type": "mert_model", "architectures": ["MERTModel"], "sample_rate": 24000, "deepnorm": True,
            "attention_relax": 32.0, "feature_extractor_cqt": False}
    c = hubert_from_hf(read_checkpoint(_edited(tmp_path, lambda x: x.update(mert)))).config
    assert (c.hf.variant, c.model.model_rate, c.data.sample_rate, c.model.token_hop) == ("mert", 24000, 24000, 960)
    assert c.model.residual_scale == pytest.approx(6 ** 0.25)  # deepnorm: (2 · 3 layers)^¼
    with pytest.raises(ConfigError, match="model.arch"):  # a converted tower does not train
        SSLTask(c).validate()
    cases = [({"model_type": "wav2vec2"}, "model_type"), ({"feature_extractor_cqt": True}, "feature_extractor_cqt"),
             ({"conv_pos_batch_norm": True}, "conv_pos_batch_norm"), ({"hidden_act": "relu"}, "hidden_act"),
             ({"feat_extract_norm": "batch"}, "feat_extract_norm"), ({"num_hidden_layers": 4}, "layers.3")]
    for edit, message in cases:
        shutil.rmtree(tmp_path / "edited")
        with pytest.raises(ConversionError, match=message):
            hubert_from_hf(read_checkpoint(_edited(tmp_path, lambda x: x.update(edit))))
    with pytest.raises(ConversionError, match="sample_rate"):
        hubert_from_hf(read_checkpoint(f"{FIXTURES}/hubert"), sample_rate=24001)


def test_resampler_matches_soxr_and_removes_what_aliases():
    t = np.arange(SR) / SR
    x = (np.sin(2 * np.pi * 440 * t) + 0.5 * np.sin(2 * np.pi * 5000 * t + 1)).astype(np.float32)
    ours = np.asarray(resample(jnp.asarray(x[None]), SR, 16000))[0]
    assert ours.shape == (16000,)
    # Measured: 3.2e-5 from soxr away from the edges (zero-extended here); a 10-kHz tone, above the new
    # Nyquist, comes out at 2.9e-5.
    assert np.abs(ours - soxr.resample(x, SR, 16000))[200:-200].max() < 2e-4
    alias = np.asarray(resample(jnp.asarray(np.sin(2 * np.pi * 10000 * t).astype(np.float32)), SR, 16000))
    assert np.abs(alias[200:-200]).max() < 2e-4


def test_convert_cli_refuses_a_mert_with_cqt_in_one_line(tmp_path):
    source = _edited(tmp_path, lambda x: x.update(model_type="mert_model", feature_extractor_cqt=True))
    proc = run_cli("launch.convert", "--format=hf", f"--input={source}", f"--out={tmp_path / 'out'}", devices=1)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "feature_extractor_cqt" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "ssl")


@pytest.mark.slow  # a kmeans stage fitted and 120 clips tokenized: ~20 CPU-seconds
def test_token_probe_runs_end_to_end_on_the_converted_hubert(prepared_data, tmp_path):
    """Plumbing, not quality: k-means fits on the converted tower's pooled frames (`upstream.ssl` = the
    bundle's ssl folder, 24-kHz data resampled to 16 kHz inside), the tokenizer loads from the kmeans
    stage, and issue 5's probe (nearest centroid on token histograms, 4-fold CV) reads its tokens (120
    clips of 1.6 s, 40 tokens each, to keep the test short)."""
    probe = prepared_data(source="synthetic", num_clips=120, seed=1, clip_seconds=1.6, sample_rate=SR,
                          val_fraction=0.0)
    manifest = convert(f"{FIXTURES}/hubert", str(tmp_path / "bundle"))
    assert manifest["stages"] == ["ssl"] and manifest["variant"] == "hubert"
    km_dir = str(tmp_path / "kmeans")
    summary = train(get_task(stage_config("kmeans", {
        "upstream.ssl": str(tmp_path / "bundle" / "ssl"), "data.path": probe, "model.embed_dim": 32,
        "model.layer": 2, "model.num_clusters": PROBE_CLUSTERS, "data.num_batches": 4, "train.num_steps": 5,
        "train.checkpoint_every": 5})), km_dir)
    assert summary["status"] == "done"
    tok = SemanticTokenizer.load(km_dir)
    assert (tok.hop, tok.sample_rate, tok.layer, tok.vocab_size) == (960, SR, 2, PROBE_CLUSTERS)

    clips = read_clips(probe)
    audio = np.stack([x["audio"][: int(1.6 * SR)] for x in clips])
    tokens = np.asarray(tok(jnp.asarray(audio)))
    assert tokens.shape == (120, 40) and 0 <= tokens.min() and tokens.max() < PROBE_CLUSTERS
    assert len(np.unique(tokens)) > PROBE_CLUSTERS // 2

    # The pooled frames are the tower's 50-Hz frames of the resampled audio averaged in pairs.
    with jax.default_matmul_precision("highest"):
        pooled = tok.model.apply({"params": tok.ssl_params}, jnp.asarray(audio[:2]), 2,
                                 method=type(tok.model).hidden_states)
        states, _ = tok.model.apply({"params": tok.ssl_params}, resample(jnp.asarray(audio[:2]), SR, 16000))
    frames = np.asarray(states[2])  # 25,600 samples at 16 kHz: 79 frames
    assert frames.shape[1] == 79  # token t averages frames 2t and 2t + 1; the last one has frame 78 only
    want = np.concatenate([frames[:, :78].reshape(2, 39, 2, -1).mean(2), frames[:, 78:]], 1)
    np.testing.assert_allclose(np.asarray(pooled), want, atol=1e-5)

    labels = {"key": [x["attributes"]["tonic"] for x in clips], "lead": [x["attributes"]["lead"] for x in clips],
              "tempo band": [tempo_band(x["attributes"]["tempo_bpm"]) for x in clips],
              "drums": [x["attributes"]["drums"] for x in clips]}
    scores = {name: probe_accuracy(tokens, y, PROBE_CLUSTERS) for name, y in labels.items()}
    print("probe accuracy on the random-weight tiny HuBERT's tokens:", scores)
    assert all(0.0 <= s <= 1.0 for s in scores.values()), scores
