"""Padding is never trained as music: a short clip padded to the crop gives what the clip cut to its length
gives (the LMs' losses, MuLan's embedding), and padded frames count in no loss (SSL, DPD)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.audio.padding import frame_mask
from melody_jax.frozen.mulan import FrozenMuLan
from melody_jax.models.mulan import MuLan
from melody_jax.models.ssl_loss import wav2vec2_loss
from melody_jax.tasks.registry import get_task
from melody_jax.tasks.musicgen import synthetic_examples
from melody_jax.training.sharding import MESH_AXES
from tests.helpers import stage_config

KEY = jax.random.key(0)


def test_frame_mask_counts_whole_frames_only():
    mask = np.zeros((2, 10), np.float32)
    mask[0, :7] = 1
    mask[1] = 1
    np.testing.assert_array_equal(np.asarray(frame_mask(mask, 3, 4)), [[1, 1, 0, 0], [1, 1, 1, 0]])


def test_musicgen_loss_of_padded_clip_equals_cut_clip():
    """Codes of 16 frames of which 2 are real (a 1-s clip in an 8-s crop at this scale); the padded frames
    hold random codes, which must change nothing (delay pattern, causal LM)."""
    task = get_task(stage_config("musicgen"))
    c = task.config
    params = task.init_params(KEY)
    ex = synthetic_examples(3, 0, 1, frames=c.data.frames, num_codebooks=c.model.num_codebooks,
                            codebook_size=c.model.codebook_size, chroma_hop=c.model.chroma_hop_frames,
                            melody_frames=c.model.melody_frames, max_note_frames=c.data.max_note_frames)
    valid = 2
    codes = ex["codes"].copy()
    codes[:, :, valid:] = np.random.default_rng(0).integers(0, c.model.codebook_size, codes[:, :, valid:].shape)
    tokens = np.zeros((1, c.model.max_text_length), np.int32)
    tokens[0, :3] = [1, 70, 80]
    text = {"text_tokens": tokens, "text_mask": tokens > 0, "chroma": ex["chroma"]}
    frames = (np.arange(c.data.frames) < valid).astype(np.float32)[None]
    loss = jax.jit(task.loss, static_argnames="train")
    padded, m_pad = loss(params, {"codes": codes, "frame_mask": frames, **text}, KEY, train=False)
    cut, m_cut = loss(params, {"codes": codes[:, :, :valid], **text}, KEY, train=False)
    unmasked, _ = loss(params, {"codes": codes, "frame_mask": np.ones_like(frames), **text}, KEY, train=False)
    assert abs(float(padded) - float(cut)) < 1e-5, (float(padded), float(cut))
    assert abs(float(m_pad["accuracy"]) - float(m_cut["accuracy"])) < 1e-6
    assert abs(float(unmasked) - float(cut)) > 1e-3  # the padded codes would have mattered


def test_semantic_lm_loss_of_padded_clip_equals_cut_clip():
    task = get_task(stage_config("semantic_lm"))
    c = task.config
    params = task.init_params(KEY)
    rng = np.random.default_rng(1)
    mulan = rng.integers(0, c.model.mulan_codebook_size, (1, c.model.num_mulan_tokens)).astype(np.int32)
    semantic = rng.integers(0, c.model.semantic_vocab_size, (1, c.data.semantic_len)).astype(np.int32)
    valid = 2  # of 16 tokens: 1 s of a 10-s crop at this scale
    mask = (np.arange(c.data.semantic_len) < valid).astype(np.float32)[None]
    loss = jax.jit(task.loss, static_argnames="train")
    padded, m_pad = loss(params, {"mulan_tokens": mulan, "semantic_tokens": semantic, "semantic_mask": mask}, KEY,
                         train=False)
    cut, m_cut = loss(params, {"mulan_tokens": mulan, "semantic_tokens": semantic[:, :valid]}, KEY, train=False)
    whole, _ = loss(params, {"mulan_tokens": mulan, "semantic_tokens": semantic, "semantic_mask": np.ones_like(mask)},
                    KEY, train=False)
    assert abs(float(padded) - float(cut)) < 1e-5, (float(padded), float(cut))
    assert float(m_pad["accuracy"]) == pytest.approx(float(m_cut["accuracy"]), abs=1e-6)
    assert abs(float(whole) - float(cut)) > 1e-3


@pytest.fixture(scope="module")
def mulan():
    task = get_task(stage_config("mulan"))
    model: MuLan = task.model
    rate = task.config.data.sample_rate
    clip = 0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate, dtype=np.float32)  # 1 s
    clip += 0.05 * np.random.default_rng(2).standard_normal(rate).astype(np.float32)
    padded = np.zeros((1, 10 * rate), np.float32)
    padded[0, :rate] = clip
    mask = (np.arange(10 * rate) < rate).astype(np.float32)[None]
    return model, task.init_params(KEY), clip[None], padded, mask, task


def test_mulan_embedding_of_padded_clip_equals_cut_clip(mulan):
    model, params, cut, padded, mask, _ = mulan
    embed = jax.jit(lambda a, m: model.apply({"params": params}, a, m, method=MuLan.embed_audio))
    ours = embed(padded, mask)
    reference = embed(cut, np.ones_like(cut))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), atol=1e-5)
    assert float(jnp.abs(embed(padded, None) - reference).max()) > 1e-3  # unmasked, the silence counts


def test_frozen_mulan_averages_valid_windows_only(mulan):
    model, params, cut, padded, mask, task = mulan
    window = int(round(task.config.data.crop_seconds * task.config.data.sample_rate))  # 2 s: 5 windows padded
    codebooks = jnp.asarray(np.random.default_rng(3).standard_normal((2, 4, model.out_dim)), jnp.float32)
    frozen = FrozenMuLan(model, {"mulan": params, "codebooks": codebooks}, 16, window, task.config.data.sample_rate)
    fn = jax.jit(frozen.audio_embedding_fn)
    np.testing.assert_allclose(np.asarray(fn(frozen.params, padded, mask)),
                               np.asarray(fn(frozen.params, cut, np.ones_like(cut))), atol=1e-5)


def _ssl_out(rng: np.random.Generator, frames: int) -> dict[str, jax.Array]:
    return {"mask": jnp.asarray(rng.random((2, frames)) < 0.6),
            "context": jnp.asarray(rng.standard_normal((2, frames, 8))),
            "targets": jnp.asarray(rng.standard_normal((2, frames, 8))),
            "codes": jnp.asarray(rng.integers(0, 50, (2, frames, 2))), "prob_perplexity": jnp.asarray(3.0),
            "code_perplexity": jnp.asarray(3.0), "feature_penalty": jnp.asarray(0.1)}


def test_ssl_loss_excludes_padded_frames():
    """What the model outputs at padded frames (context, targets, codes) changes neither the loss nor which
    frames are scored; the same frames unmasked do change it."""
    frames, valid_len = 40, 12
    out = _ssl_out(np.random.default_rng(4), frames)
    other = dict(out)
    rng = np.random.default_rng(5)
    for k in ("context", "targets"):
        other[k] = out[k].at[:, valid_len:].set(jnp.asarray(rng.standard_normal(out[k][:, valid_len:].shape)))
    valid = jnp.asarray(np.arange(frames) < valid_len, jnp.float32)[None].repeat(2, 0)
    kw = dict(num_negatives=4, logit_temperature=0.1, num_codes=50, diversity_weight=0.1, feature_penalty_weight=1.0)
    loss = jax.jit(lambda o, v: wav2vec2_loss(o, jax.random.key(6), valid=v, **kw)[0])
    a, b = float(loss(out, valid)), float(loss(other, valid))
    assert a == pytest.approx(b, abs=1e-6)
    ones = jnp.ones_like(valid)
    assert abs(float(loss(out, ones)) - float(loss(other, ones))) > 1e-3


def test_dpd_velocity_mse_over_valid_latent_frames_only():
    task = get_task(stage_config("dpd"))
    params = task.init_params(KEY)
    batch = next(task.batches(task_mesh(), "train"))
    batch = {k: np.asarray(v)[:2] for k, v in batch.items()}
    length = batch["latents"].shape[1]
    valid = (np.arange(length) < length // 4).astype(np.float32)[None].repeat(2, 0)
    loss = jax.jit(task.loss, static_argnames="train")
    masked, _ = loss(params, {**batch, "latent_mask": valid}, KEY, train=False)
    ones, _ = loss(params, {**batch, "latent_mask": np.ones_like(valid)}, KEY, train=False)
    # the masked loss is the mean over the valid frames of the same per-frame errors, all frames' without a mask
    errors = np.asarray(jax.jit(lambda p, b: per_frame_errors(task, p, b))(params, batch))
    assert float(masked) == pytest.approx(float((errors * valid).sum() / valid.sum()), rel=1e-5)
    assert float(ones) == pytest.approx(float(errors.mean()), rel=1e-5)
    assert abs(float(masked) - float(ones)) > 1e-4


def per_frame_errors(task, params, batch) -> jax.Array:
    """[B, L] velocity squared errors as `DPDTask.loss` draws them (train=False: no CFG dropout)."""
    from melody_jax.tasks.dpd import multi_chunk_noising, training_chunk_length

    noise_key, _ = jax.random.split(KEY)
    m = task.config.model
    noisy = multi_chunk_noising(noise_key, batch["latents"], m.num_chunks, training_chunk_length(task.config))
    v_hat = task.model.apply({"params": params}, noisy.z_noisy, noisy.delta, batch["semantic_tokens"], None)
    return jnp.mean(jnp.square(v_hat - noisy.target), -1)


def task_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1, 1, 1), MESH_AXES, devices=jax.devices()[:1], axis_types=(jax.sharding.AxisType.Auto,) * 3)


def test_min_segment_ratio_skips_mostly_padded_clips_and_resumes_exactly(prepared_data):
    """3-s clips cut at 2 s give 2-s and 1-s examples; with 2-s crops and ratio 0.75 only the 2-s ones are
    read, epochs hold those only, and a restored iterator continues exactly (across an epoch boundary)."""
    from data_pipeline.input import default_data_config, make_train_iterator
    from melody_jax.training.errors import ConfigError
    from melody_jax.training.sharding import make_mesh

    rate = 8000
    path = prepared_data(source="synthetic", num_clips=6, seed=3, clip_seconds=3.0, sample_rate=rate,
                         segment_seconds=2.0)
    c = default_data_config()
    c.path, c.sample_rate, c.crop_seconds, c.shuffle_buffer = path, rate, 2.0, 4
    mesh = make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    kept = make_train_iterator({**c, "min_segment_ratio": 0.75}, global_batch_size=8, mesh=mesh, seed=0,
                               with_text=False)
    every = make_train_iterator(c, global_batch_size=8, mesh=mesh, seed=0, with_text=False)
    assert every.examples_per_epoch == 12 and kept.examples_per_epoch == 6
    assert float(np.asarray(next(every)["mask"]).mean(1).min()) == pytest.approx(0.5)  # the 1-s pieces
    batches = [next(kept) for _ in range(3)]  # 24 rows: 4 epochs of the 6 kept examples
    for b in batches:
        assert float(np.asarray(b["mask"]).min()) == 1.0
    ids = np.concatenate([np.asarray(b["index"]) for b in batches])
    assert all(sorted(ids[i:i + 6]) == sorted(ids[:6]) for i in range(0, 24, 6))
    restored = make_train_iterator({**c, "min_segment_ratio": 0.75}, global_batch_size=8, mesh=mesh, seed=0,
                                   with_text=False)
    replay = make_train_iterator({**c, "min_segment_ratio": 0.75}, global_batch_size=8, mesh=mesh, seed=0,
                                 with_text=False)
    next(replay)
    restored.set_state(replay.get_state())
    for b in batches[1:]:
        np.testing.assert_array_equal(np.asarray(next(restored)["index"]), np.asarray(b["index"]))
    with pytest.raises(ConfigError, match="config.data.min_segment_ratio"):
        make_train_iterator({**c, "min_segment_ratio": 1.5}, global_batch_size=8, mesh=mesh, seed=0)
