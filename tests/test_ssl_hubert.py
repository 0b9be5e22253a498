"""The HuBERT objective of the ssl stage (issue 22): frame features against librosa/scipy, the masked
cross-entropy against NumPy, k-means targets fitted in `setup` and assigned in the step, iteration 2 on a
trained SSL model's layer, the wav2vec 2.0 loss's count of codes in use, and one-line config errors."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.fft

from melody_jax.audio.frame_features import MAX_ONSET_AGE, NUM_MELS, NUM_MFCC, frame_features
from melody_jax.models.ssl_loss import hubert_loss, wav2vec2_loss
from melody_jax.tasks.registry import get_task
from melody_jax.tasks.ssl import SSLTask
from melody_jax.training.errors import ConfigError
from melody_jax.training.loop import train
from tests.helpers import stage_config

SR, HOP = 24000, 960
HUBERT = {"model.objective": "hubert", "model.num_targets": 8, "model.target_batches": 2, "data.crop_seconds": 0.8,
          "data.eval_split": "", "train.batch_size": 8}


def test_frame_features_match_librosa_and_scipy():
    """One frame per hop (the conv encoder's count); chroma of a 440 Hz tone peaks at A; MFCC = DCT-II of log-mel."""
    t = np.arange(int(0.5 * SR)) / SR
    audio = np.stack([np.sin(2 * np.pi * 440.0 * t), np.sin(2 * np.pi * 261.63 * t)]).astype(np.float32)
    feats = np.asarray(frame_features(jnp.asarray(audio), SR, HOP, ("logmel", "mfcc", "chroma")))
    assert feats.shape == (2, len(t) // HOP, NUM_MELS + NUM_MFCC + 12)
    logmel, mfcc, chroma = np.split(feats, [NUM_MELS, NUM_MELS + NUM_MFCC], -1)
    np.testing.assert_allclose(mfcc, scipy.fft.dct(logmel, norm="ortho", axis=-1)[..., :NUM_MFCC], rtol=1e-4, atol=1e-3)
    # A and C (the first frame, half reflect padding, is left out for the low tone's 12.5-Hz bins)
    assert (chroma[0].argmax(-1) == 9).all() and (chroma[1, 1:].argmax(-1) == 0).all()
    want = librosa.feature.chroma_stft(y=audio[0], sr=SR, n_fft=2 * HOP, hop_length=HOP, tuning=0.0).T[:chroma.shape[1]]
    np.testing.assert_allclose(chroma[0, 1:], want[1:], atol=1e-3)  # librosa pads with zeros, we reflect


def test_flux_marks_clicks_not_held_notes():
    """"flux" is the half-wave rectified frame difference of log-mel: broadband and large where a click starts,
    zero on a held tone once its first frames have passed."""
    t = np.arange(int(1.0 * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    clicks = tone.copy()
    for start in (8, 16):  # a 5-ms noise burst at the start of frames 8 and 16
        clicks[start * HOP: start * HOP + 120] += np.random.default_rng(start).standard_normal(120)
    audio = jnp.asarray(np.stack([tone, clicks]).astype(np.float32))
    logmel, flux = np.split(np.asarray(frame_features(audio, SR, HOP, ("logmel", "flux"))), [NUM_MELS], -1)
    want = np.maximum(np.diff(logmel, axis=1, prepend=logmel[:, :1]), 0)
    np.testing.assert_allclose(flux, want, atol=1e-5)
    onset = flux.mean(-1)  # librosa's onset strength: the band mean
    assert onset[0, 3:].max() < 0.05 and onset[1, 8] > 1.0 and onset[1, 16] > 1.0, (onset[0], onset[1])
    assert (flux[1, 8] > 0.5).mean() > 0.8  # broadband: most bands rise


@pytest.mark.parametrize("period", [7, 12, 19])
def test_onset_age_counts_frames_since_each_click(period):
    """"onset_age" restarts at 0 on every click of a click track over a held tone and counts the frames after
    it; before the first click, and on a clip with no onset (the tone alone), it stays at the cap."""
    t = np.arange(int(3.0 * SR)) / SR
    tone = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    clicks = tone.copy()
    starts = np.arange(5, len(t) // HOP, period)
    for start in starts:
        clicks[start * HOP: start * HOP + 120] += np.random.default_rng(int(start)).standard_normal(120)
    audio = jnp.asarray(np.stack([tone, clicks]).astype(np.float32))
    age = np.asarray(frame_features(audio, SR, HOP, ("onset_age",)))[..., 0]
    frames = np.arange(age.shape[1])
    last = starts[np.searchsorted(starts, frames, side="right") - 1]
    want = np.where(frames < starts[0], MAX_ONSET_AGE, np.minimum(frames - last, MAX_ONSET_AGE))
    np.testing.assert_array_equal(age[1], want)
    np.testing.assert_array_equal(age[0, 3:], MAX_ONSET_AGE)  # the tone's first frames rise from reflect padding


def test_hubert_loss_against_numpy():
    """Two codebooks: cross-entropies add up over codebooks with their weights, accuracy and majority average
    over them."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 6, 2, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 6, 2)).astype(np.int32)
    targets[..., 1] = np.minimum(targets[..., 1], 2)  # the second codebook uses 3 targets
    mask = rng.random((2, 6)) < 0.5
    out = {"logits": jnp.asarray(logits), "mask": jnp.asarray(mask), "feature_penalty": jnp.asarray(0.5)}
    loss, m = hubert_loss(out, jnp.asarray(targets), codebook_weights=[1.0, 0.5], unmasked_weight=0.25,
                          feature_penalty_weight=2.0)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0] @ np.array([1.0, 0.5])
    np.testing.assert_allclose(float(loss), ce[mask].mean() + 0.25 * ce[~mask].mean() + 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(m["accuracy"]), (logits.argmax(-1) == targets)[mask].mean(), rtol=1e-6)
    majority = [np.bincount(targets[..., i].ravel()).max() / targets[..., i].size for i in range(2)]
    assert float(m["majority"]) == pytest.approx(np.mean(majority))
    assert float(m["targets_in_use"]) == len(np.unique(targets[..., 0])) + 3
    # frames of padding (valid = 0) are scored neither masked nor unmasked
    valid = np.ones((2, 6), np.float32)
    valid[:, 4:] = 0
    loss, m = hubert_loss(out, jnp.asarray(targets), codebook_weights=[1.0, 0.5], unmasked_weight=0.25,
                          feature_penalty_weight=2.0, valid=jnp.asarray(valid))
    real = valid > 0
    np.testing.assert_allclose(float(loss), ce[mask & real].mean() + 0.25 * ce[~mask & real].mean() + 1.0, rtol=1e-5)


def test_wav2vec2_loss_counts_codes_in_use():
    b, t = 2, 10
    out = {"context": jnp.ones((b, t, 4)), "targets": jnp.ones((b, t, 4)), "mask": jnp.ones((b, t), bool),
           "prob_perplexity": jnp.asarray(1.0), "code_perplexity": jnp.asarray(1.0),
           "feature_penalty": jnp.asarray(0.0)}
    kwargs = dict(num_negatives=3, logit_temperature=0.1, num_codes=16, diversity_weight=0.0,
                  feature_penalty_weight=0.0)
    codes = jnp.stack([jnp.broadcast_to(jnp.arange(t) % 5, (b, t)), jnp.zeros((b, t), jnp.int32)], -1)  # 5 + 1
    assert float(wav2vec2_loss({**out, "codes": codes}, jax.random.key(0), **kwargs)[1]["codes_in_use"]) == 6.0


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="objective"):
        SSLTask(stage_config("ssl", {"data.path": "x", "model.objective": "byol"})).validate()
    with pytest.raises(ConfigError, match="target_features"):
        SSLTask(stage_config("ssl", {"data.path": "x", **HUBERT, "model.target_features": ["cqt"]})).validate()
    with pytest.raises(ConfigError, match="upstream.ssl"):
        SSLTask(stage_config("ssl", {"data.path": "x", "model.objective": "wav2vec2", "upstream.ssl": "y"})).validate()
    with pytest.raises(ConfigError, match="target_weights"):
        c = stage_config("ssl", {"data.path": "x", **HUBERT})
        c.model.target_weights = [1.0]  # two codebooks (mfcc, chroma)
        SSLTask(c).validate()
    with pytest.raises(ConfigError, match="conv_norm"):
        SSLTask(stage_config("ssl", {"data.path": "x", "model.conv_norm": "batch"})).validate()


@pytest.mark.slow
def test_hubert_iterations_train_through_the_loop(tmp_path, prepared_data):
    """Iteration 1 (acoustic targets) and 2 (block 1 of iteration 1's model) run through the loop, each with
    targets of the width of what it clusters. One device: 8-device HuBERT training is test_ssl_stage.py's."""
    data = prepared_data(source="synthetic", num_clips=16, seed=0, clip_seconds=1.0, sample_rate=SR, val_fraction=0.0)
    first, second = str(tmp_path / "it1"), str(tmp_path / "it2")
    task = get_task(stage_config("ssl", {"data.path": data, "train.num_steps": 3, "mesh_devices": 1, **HUBERT}))
    assert train(task, first)["status"] == "done"
    assert [cb["centroids"].shape for cb in task.targets["codebooks"]] == [(8, 20), (8, 12)]  # mfcc, chroma
    task2 = get_task(stage_config("ssl", {"data.path": data, "train.num_steps": 3, "mesh_devices": 1,
                                          "upstream.ssl": first, "model.target_layer": 1, **HUBERT}))
    assert train(task2, second)["status"] == "done"
    assert [cb["centroids"].shape for cb in task2.targets["codebooks"]] == [(8, 64)]  # the tiny model's width
    for t, w in ((task, first), (task2, second)):
        line = [json.loads(x) for x in open(f"{w}/metrics.jsonl")][-1]
        assert {"masked_loss", "accuracy", "majority", "targets_in_use", "predictions_in_use"} <= set(line)
        assert 1 <= line["targets_in_use"] <= 8 * len(t.targets["codebooks"]) and line["masked_loss"] > 0
