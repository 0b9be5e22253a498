"""Semantic LM (DESIGN §4.4): KV-cache sampling, logit filters, the synthetic rule learnt, cached records, meshes."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from melody_jax.models.semantic_lm import NULL_CODE, stream_ids
from melody_jax.pipelines.lm_sampling import (continue_tokens, continue_windows, sample, sample_from_logits,
                                              teacher_forced_logits)
from melody_jax.tasks.semantic_lm import SemanticLMTask, rule_targets, synthetic_tokens
from melody_jax.text.byte_tokenizer import decode
from data_pipeline.record_shards import write_cache
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.training.errors import ConfigError
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import train
from melody_jax.training.sharding import activate, make_mesh
from tests.helpers import stage_config, stage_layout, train_and_restore

CODES = 32  # data.synthetic_codes of the figures below


def lm_config(overrides=None):
    """The tiny preset at the vocabularies (1024) and length (20) the figures below were measured at:
    the tiny preset itself now takes the tiny k-means' and RVQ's sizes (32, 16) and the DPD's 16 tokens."""
    return stage_config("semantic_lm", {"model.semantic_vocab_size": 1024, "model.mulan_codebook_size": 1024,
                                        "data.semantic_len": 20, "data.synthetic_codes": CODES, **(overrides or {})})


@pytest.fixture(scope="module")
def random_model():
    task = SemanticLMTask(lm_config())
    return task.model, nn.meta.unbox(task.init_params(jax.random.key(0)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    summary, records, task, params = train_and_restore(lm_config({"mesh_devices": 1}), str(tmp_path_factory.mktemp("trained")))
    return summary, records, task.model, params


def test_paper_preset_matches_the_paper_size():
    task = SemanticLMTask(stage_config("semantic_lm", preset="paper"))
    shapes = jax.eval_shape(task.init_params, jax.random.key(0))
    count = sum(x.size for x in jax.tree.leaves(shapes))
    print(f"semantic LM paper preset: {count / 1e6:.1f}M parameters (paper: 429.5M)")
    assert abs(count / 429.5e6 - 1) < 0.05, count  # 417.3M: 24 × 16.8M blocks + 13.6M embeddings + 1M head
    assert shapes["decoder"]["embedding"].value.shape == (13 * 1024, 1024)
    assert shapes["decoder"]["head"]["kernel"].value.shape == (1024, 1024)


def test_stream_ids_offset_each_vocabulary():
    codes = jnp.array([[5] * 14])
    ids = stream_ids(codes, jnp.arange(14), num_prefix=12, prefix_codebook_size=1024)
    np.testing.assert_array_equal(ids[0], [1024 * q + 5 for q in range(12)] + [12 * 1024 + 5] * 2)
    codes = codes.at[0, 3].set(NULL_CODE)  # the null code reads its level's row after the 13 vocabularies
    ids = stream_ids(codes, jnp.arange(14), num_prefix=12, prefix_codebook_size=1024, null_base=13 * 1024)
    np.testing.assert_array_equal(ids[0], [1024 * q + 5 if q != 3 else 13 * 1024 + 3 for q in range(12)]
                                  + [12 * 1024 + 5] * 2)


def test_cached_decoding_equals_full_forward(random_model):
    model, params = random_model
    mulan, semantic = synthetic_tokens(9, 0, 4, 12, 20, CODES, 4)
    full = model.apply({"params": params}, np.concatenate([mulan, semantic], 1)[:, :-1])[:, 11:]
    cached = teacher_forced_logits(model, params, mulan, semantic)
    assert cached.shape == (4, 20, 1024)
    err = float(jnp.abs(cached - full).max())
    assert err < 1e-4 * float(jnp.abs(full).max()), f"cached logits differ by {err}"


def truncated_softmax(logits, temperature, top_k, top_p):
    """Reference in numpy: softmax(logits / T) restricted to the top-k, then the top-p set."""
    z = logits / temperature
    order = np.argsort(-z, kind="stable")
    keep = np.zeros(len(z), bool)
    keep[order[:top_k or len(z)]] = True
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    mass_before = np.cumsum(p[order]) - p[order]
    keep[order[mass_before >= top_p]] = False
    p = np.where(keep, p, 0.0)
    return p / p.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 0, 1.0), (1.0, 4, 1.0), (1.0, 0, 0.8), (1.5, 6, 0.9)])
def test_filters_draw_the_truncated_softmax(temperature, top_k, top_p):
    logits = np.array([2.0, 1.5, 1.2, 1.0, 0.8, 0.5, 0.3, 0.0, -0.5, -1.0, -1.5, -3.0])
    n = 40_000
    draws = np.asarray(sample_from_logits(jax.random.key(0), jnp.broadcast_to(jnp.asarray(logits, jnp.float32),
                                                                             (n, len(logits))),
                                          temperature, top_k, top_p))
    expected = truncated_softmax(logits, temperature, top_k, top_p)
    empirical = np.bincount(draws, minlength=len(logits)) / n
    assert empirical[expected == 0].sum() == 0, "drew a token outside the top-k / top-p set"
    # a frequency's standard error is at most sqrt(0.25 / n) = 0.0025; allow 4 of them
    assert np.abs(empirical - expected).max() < 0.01, (empirical, expected)


def test_greedy_and_tiny_top_p_take_the_argmax():
    logits = jax.random.normal(jax.random.key(1), (64, 1024))
    best = np.asarray(jnp.argmax(logits, -1))
    np.testing.assert_array_equal(sample_from_logits(jax.random.key(2), logits, temperature=0.0), best)
    np.testing.assert_array_equal(sample_from_logits(jax.random.key(2), logits, top_p=1e-6), best)
    np.testing.assert_array_equal(sample_from_logits(jax.random.key(2), logits, top_k=1), best)


def test_sampling_is_deterministic_and_rows_are_independent(random_model):
    model, params = random_model
    mulan, _ = synthetic_tokens(3, 0, 4, 12, 1, CODES, 4)
    key = jax.random.key(5)
    tokens = np.asarray(sample(model, params, mulan, 8, key))
    assert tokens.shape == (4, 8) and tokens.dtype == np.int32 and (tokens >= 0).all() and (tokens < 1024).all()
    np.testing.assert_array_equal(sample(model, params, mulan, 8, key), tokens)
    assert (np.asarray(sample(model, params, mulan, 8, jax.random.key(6))) != tokens).mean() > 0.5
    # a row's tokens depend on (key, row index, its own prefix) only
    np.testing.assert_array_equal(sample(model, params, mulan[:2], 8, key), tokens[:2])
    others = mulan.copy()
    others[1:] = (others[1:] + 5) % CODES
    changed = np.asarray(sample(model, params, others, 8, key))
    np.testing.assert_array_equal(changed[0], tokens[0])
    assert (changed[1:] != tokens[1:]).any()


@pytest.mark.learning
def test_trained_model_follows_the_rule(trained):
    summary, log, model, params = trained
    losses = {m["step"]: m["loss"] for m in log}
    # seen at 150 steps: loss 7.49 → 0.012, greedy 100 % on the rule, continuations 100 %
    assert losses[1] > 2.0 and summary["loss"] < 0.1, f"loss went from {losses[1]:.3f} to {summary['loss']:.3f}"
    mulan, semantic = synthetic_tokens(123, 0, 64, 12, 20, CODES, 4)  # unseen seed
    greedy = np.asarray(sample(model, params, mulan, 20, jax.random.key(0), temperature=0.0))
    follows = greedy == rule_targets(mulan, greedy, CODES)
    assert follows.mean() > 0.95 and follows[:, 0].mean() > 0.9, f"greedy tokens follow the rule {follows.mean():.1%}"
    # continuation (DESIGN §4.6): MuLan tokens ⊕ the last 10 tokens → the next 10
    new = np.asarray(continue_tokens(model, params, mulan, semantic[:, :10], 10, jax.random.key(2), temperature=0.0))
    matches = (new == semantic[:, 10:]).mean()
    assert matches > 0.9, f"continuations match the rule {matches:.1%}"


def test_sampling_under_a_mesh_equals_one_device(random_model):
    model, params = random_model
    mulan, semantic = synthetic_tokens(9, 0, 4, 12, 20, CODES, 4)  # shapes as above: compiled already
    key = jax.random.key(5)
    single = np.asarray(sample(model, params, mulan, 8, key))
    single_logits = np.asarray(teacher_forced_logits(model, params, mulan, semantic))
    _, mesh, rules, _, shardings = stage_layout(lm_config({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}))
    sharded = jax.device_put(params, shardings.params)
    assert sharded["decoder"]["layer_0"]["mlp"]["gate"]["kernel"].sharding.spec == P("fsdp", "tensor")
    with activate(mesh, rules):
        meshed = np.asarray(sample(model, sharded, mulan, 8, key))
        meshed_logits = np.asarray(teacher_forced_logits(model, sharded, mulan, semantic))
    np.testing.assert_allclose(meshed_logits, single_logits, atol=1e-4)
    np.testing.assert_array_equal(meshed, single)


def test_cached_records_round_trip(tmp_path):
    mulan, semantic = synthetic_tokens(0, 0, 64, 12, 20, CODES, 4)
    path = str(tmp_path)
    assert write_cache(path, "train", {"mulan_tokens": mulan, "semantic_tokens": semantic}, max_bytes=3000) == 64
    config = lm_config({"data.source": "cached", "data.path": path, "train.num_steps": 3, "train.checkpoint_every": 3})
    mesh = make_mesh(config.mesh)
    it = SemanticLMTask(config).train_iterator(mesh)
    straight = [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(6)]
    # 64 records / 16 per batch: the first epoch holds each record exactly once
    rows = np.concatenate([np.concatenate([b["mulan_tokens"], b["semantic_tokens"]], 1) for b in straight[:4]])
    assert sorted(map(tuple, rows)) == sorted(map(tuple, np.concatenate([mulan, semantic], 1)))
    assert json.loads(json.dumps(it.get_state())) == {"batches": 6}
    for consumed in (2, 4, 5):  # mid-epoch, at the epoch boundary, in the second epoch
        fresh = SemanticLMTask(config).train_iterator(mesh)
        fresh.set_state({"batches": consumed})
        for k, v in next(fresh).items():
            np.testing.assert_array_equal(np.asarray(v), straight[consumed][k])
    other_seed = SemanticLMTask(lm_config({"seed": 1, "data.source": "cached", "data.path": path}))
    assert not np.array_equal(np.asarray(next(other_seed.train_iterator(mesh))["semantic_tokens"]),
                              straight[0]["semantic_tokens"])

    summary = train(get_task(config), str(tmp_path / "run"))
    assert summary["status"] == "done" and np.isfinite(summary["loss"])
    ckpt = Checkpointer(str(tmp_path / "run"), keep=3, every=1)
    assert ckpt.manager.restore(3, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"] == {"batches": 3}
    ckpt.close()

    with pytest.raises(ConfigError, match=r"field sizes .*'semantic_tokens': 20.*expects .*'semantic_tokens': 21"):
        SemanticLMTask(lm_config({"data.source": "cached", "data.path": path, "data.semantic_len": 21})).train_iterator(mesh)


def test_a_share_of_rows_is_conditioned_on_caption_tokens(tmp_path):
    """data.text_token_share: the records' caption tokens replace the audio's in that share of the rows
    (drawn per row from the step's rng); share 0 reads no caption tokens; sources without captions and
    caches without the field are refused."""
    mulan, semantic = synthetic_tokens(0, 0, 16, 12, 20, CODES, 4)
    text = (mulan + 7) % CODES
    path = str(tmp_path)
    write_cache(path, "train", {"mulan_tokens": mulan, "semantic_tokens": semantic, "mulan_text_tokens": text})
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    tasks = {share: SemanticLMTask(lm_config({"data.source": "cached", "data.path": path,
                                              "data.text_token_share": share, "data.shuffle_buffer": 1}))
             for share in (0.0, 0.5, 1.0)}
    assert "mulan_text_tokens" not in next(tasks[0.0].train_iterator(mesh))
    batch = {k: np.asarray(v) for k, v in next(tasks[1.0].train_iterator(mesh)).items()}
    params = nn.meta.unbox(tasks[1.0].init_params(jax.random.key(0)))
    rng = jax.random.key(3)

    def loss(share, b):
        return float(jax.jit(tasks[share].loss)(params, b, rng)[0])

    as_audio = {k: batch[k] for k in ("mulan_tokens", "semantic_tokens")}
    as_text = {**as_audio, "mulan_tokens": batch["mulan_text_tokens"]}
    assert loss(1.0, batch) == pytest.approx(loss(0.0, as_text), rel=1e-6)
    assert loss(0.0, batch) == pytest.approx(loss(0.0, as_audio), rel=1e-6)
    assert abs(loss(0.0, as_text) - loss(0.0, as_audio)) > 1e-3  # the two prefixes do differ for the model
    picked = np.asarray(jax.random.bernoulli(rng, 0.5, (16, 1)))
    assert 4 <= picked.sum() <= 12
    mixed = {**as_audio, "mulan_tokens": np.where(picked, batch["mulan_text_tokens"], batch["mulan_tokens"])}
    assert loss(0.5, batch) == pytest.approx(loss(0.0, mixed), rel=1e-6)

    with pytest.raises(ConfigError, match=r"text_token_share=0.5: data.source='synthetic' has no captions"):
        SemanticLMTask(lm_config({"data.text_token_share": 0.5})).validate()
    with pytest.raises(ConfigError, match=r"text_token_share=1.5 must be in \[0, 1\]"):
        SemanticLMTask(lm_config({"data.source": "cached", "data.path": path, "data.text_token_share": 1.5})).validate()
    write_cache(str(tmp_path / "old"), "train", {"mulan_tokens": mulan, "semantic_tokens": semantic})
    with pytest.raises(ConfigError, match=r"'mulan_text_tokens': 0.*expects .*'mulan_text_tokens': 12"):
        SemanticLMTask(lm_config({"data.source": "cached", "data.path": str(tmp_path / "old"),
                                  "data.text_token_share": 0.5})).train_iterator(mesh)


@pytest.mark.slow  # four frozen stages, a training and a resume
def test_frozen_models_tokenise_audio_inside_the_step(tmp_path, prepared_data):
    """data.source="frozen_models": the in-step tokens are the frozen stages' own tokens (checked
    through the loss), the run trains and evaluates through the loop and resumes by audio position."""
    from benchmarks.untrained import init_workdir
    from melody_jax.training.sharding import DEFAULT_RULES
    from tests.bundle_fixture import tiny_configs

    configs = tiny_configs()
    for stage in ("ssl", "kmeans", "mulan", "rvq"):
        init_workdir(configs[stage], str(tmp_path / stage))
    data = prepared_data(source="synthetic", num_clips=12, clip_seconds=2.0, sample_rate=24000, seed=2,
                         val_fraction=0.25)
    fields = {f"upstream.{s}": str(tmp_path / s) for s in ("ssl", "kmeans", "mulan", "rvq")}
    lm = configs["semantic_lm"]
    overrides = {"data.source": "frozen_models", "data.path": data, "data.semantic_len": 16,
                 "model.semantic_vocab_size": lm.model.semantic_vocab_size,
                 "model.mulan_codebook_size": lm.model.mulan_codebook_size, "train.batch_size": 8,
                 "train.num_steps": 2, "train.eval_every": 2, "train.checkpoint_every": 2, "mesh_devices": 1, **fields}
    config = stage_config("semantic_lm", overrides)
    with pytest.raises(ConfigError, match=r"config.upstream.ssl is empty"):
        SemanticLMTask(stage_config("semantic_lm", {"data.source": "frozen_models", "data.path": data})).validate()
    task = SemanticLMTask(config)
    task.validate()
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with activate(mesh, DEFAULT_RULES):
        task.setup(mesh)
        batch = next(task.train_iterator(mesh))
        assert batch["audio"].shape == (8, 16 * 960)  # 16 tokens at 25 Hz, 24 kHz
        tokenizer, mulan = task.tokenizer, task.mulan
        params = jax.jit(lambda r: nn.meta.unbox(task.init_params(r)))(jax.random.key(0))
        in_step, _ = jax.jit(task.loss)(params, batch, jax.random.key(1))
        outside = {"mulan_tokens": mulan.audio_tokens(batch["audio"]), "semantic_tokens": tokenizer(batch["audio"])}
        assert outside["semantic_tokens"].shape == (8, 16) and outside["mulan_tokens"].shape == (8, 12)
        expected, _ = jax.jit(task.loss)(params, outside, jax.random.key(1))
    np.testing.assert_allclose(float(in_step), float(expected), rtol=1e-5)
    # data.text_token_share=1: every row's prefix is its caption's MuLan text tokens, made in the step
    captioned = SemanticLMTask(stage_config("semantic_lm", {**overrides, "data.text_token_share": 1.0}))
    with activate(mesh, DEFAULT_RULES):
        captioned.setup(mesh)
        batch = next(captioned.train_iterator(mesh))
        captions = [decode(row[m]) for row, m in zip(np.asarray(batch["text_tokens"]), np.asarray(batch["text_mask"]))]
        in_step, _ = jax.jit(captioned.loss)(params, batch, jax.random.key(1))
        outside = {"mulan_tokens": mulan.text_tokens(captions), "semantic_tokens": tokenizer(batch["audio"])}
        expected, _ = jax.jit(task.loss)(params, outside, jax.random.key(1))
    assert all(captions) and len(set(captions)) > 1
    np.testing.assert_allclose(float(in_step), float(expected), rtol=1e-5)
    summary = train(get_task(config), str(tmp_path / "run"))
    assert summary["status"] == "done" and summary["step"] == 2 and np.isfinite(summary["eval_loss"])
    ckpt = Checkpointer(str(tmp_path / "run"), keep=3, every=1)
    restored = ckpt.manager.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    ckpt.close()
    assert restored["examples_consumed"] == 2 * 8 // jax.process_count()  # the audio iterator's position
    with pytest.raises(ConfigError, match=r"k-means has 32 clusters, model.semantic_vocab_size is 64"):
        SemanticLMTask(stage_config("semantic_lm", {"data.source": "frozen_models", "data.path": data,
                                     "model.semantic_vocab_size": 64, **fields})).setup(mesh)


def test_prefix_dropout_trains_the_null_prefix():
    """model.cfg_dropout: that share of the training rows (drawn per row from the step's rng, apart from the text
    share's draw) read the null prefix, whose 12 table rows only those rows train; evaluation drops nothing."""
    task = SemanticLMTask(lm_config({"model.cfg_dropout": 0.5}))
    params = nn.meta.unbox(task.init_params(jax.random.key(0)))
    assert params["decoder"]["embedding"].shape == (13 * 1024 + 12, 64)
    mulan, semantic = synthetic_tokens(0, 0, 16, 12, 20, CODES, 4)
    batch, rng = {"mulan_tokens": mulan, "semantic_tokens": semantic}, jax.random.key(3)
    loss = jax.jit(task.loss, static_argnames="train")
    dropped = np.asarray(jax.random.bernoulli(jax.random.fold_in(rng, 1), 0.5, (16, 1)))
    assert 4 <= dropped.sum() <= 12
    nulled = {**batch, "mulan_tokens": np.where(dropped, NULL_CODE, mulan)}
    assert float(loss(params, batch, rng)[0]) == pytest.approx(float(loss(params, nulled, rng, train=False)[0]),
                                                                rel=1e-6)
    assert float(loss(params, batch, rng, train=False)[0]) != pytest.approx(float(loss(params, batch, rng)[0]))
    null_rows = lambda train: jax.grad(lambda p: loss(p, batch, rng, train=train)[0])(params)[  # noqa: E731
        "decoder"]["embedding"][13 * 1024:]
    assert float(jnp.abs(null_rows(True)).min()) > 0 and float(jnp.abs(null_rows(False)).max()) == 0
    with pytest.raises(ConfigError, match=r"cfg_dropout=1.0 must lie in \[0, 1\)"):
        SemanticLMTask(lm_config({"model.cfg_dropout": 1.0})).validate()


def test_guided_sampling_draws_from_the_guided_logits():
    """With a null prefix, each token is the argmax (temperature 0) of c + (s − 1)(c − u) over the full forwards of
    the prompted and the null stream, fed the tokens drawn so far; scale 1 is the unguided sampler; the
    scanned continuation windows guide as the window-by-window calls do."""
    task = SemanticLMTask(lm_config({"model.cfg_dropout": 0.2}))
    model, params = task.model, nn.meta.unbox(task.init_params(jax.random.key(1)))
    mulan, _ = synthetic_tokens(3, 0, 3, 12, 1, CODES, 4)
    null = np.full_like(mulan, NULL_CODE)
    guided = np.asarray(sample(model, params, mulan, 6, jax.random.key(0), 0.0, null_prefix=null, cfg_scale=3.0))
    expected = np.zeros((3, 0), np.int32)
    for _ in range(6):
        c, u = (model.apply({"params": params}, np.concatenate([p, expected], 1))[:, -1] for p in (mulan, null))
        expected = np.concatenate([expected, np.asarray(jnp.argmax(c + 2.0 * (c - u), -1))[:, None]], 1)
    np.testing.assert_array_equal(guided, expected)
    plain = np.asarray(sample(model, params, mulan, 6, jax.random.key(0), 0.0))
    assert (plain != guided).any()  # the random model's two prefixes differ enough to change a greedy token
    np.testing.assert_array_equal(sample(model, params, mulan, 6, jax.random.key(0), 0.0, null_prefix=null), plain)
    keys = jax.vmap(jax.random.key)(jnp.arange(3, dtype=jnp.uint32))
    windows = np.asarray(continue_windows(model, params, mulan, expected, keys, 2, 3, null_prefix=null, cfg_scale=2.0))
    have = expected
    for w in range(2):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, w))(keys)
        new = np.asarray(continue_tokens(model, params, mulan, have[:, -6:], 3, step_keys, null_prefix=null,
                                         cfg_scale=2.0))
        have = np.concatenate([have, new], axis=1)
    np.testing.assert_array_equal(windows, have[:, 6:])
    with pytest.raises(ValueError, match=r"null_prefix has shape \(3, 11\), the prefix \(3, 12\)"):
        sample(model, params, mulan, 6, jax.random.key(0), null_prefix=null[:, 1:], cfg_scale=2.0)
    with pytest.raises(ValueError, match=r"this LM has no null prefix to guide against"):
        sample(SemanticLMTask(lm_config()).model, params, mulan, 6, jax.random.key(0), null_prefix=null)
    with pytest.raises(ValueError, match=r"this LM has no null prefix to guide against"):
        continue_windows(SemanticLMTask(lm_config()).model, params, mulan, expected, keys, 2, 3, null_prefix=null)


def test_continue_windows_equals_window_by_window_calls(random_model):
    model, params = random_model
    prefix = jax.random.randint(jax.random.key(3), (2, model.num_prefix), 0, model.prefix_codebook_size)
    context = jax.random.randint(jax.random.key(4), (2, 6), 0, model.vocab_size)
    keys = jax.vmap(jax.random.key)(jnp.arange(2, dtype=jnp.uint32))
    scanned = np.asarray(continue_windows(model, params, prefix, context, keys, 3, 4, first_window=2, top_k=5))
    have, pieces = np.asarray(context), []
    for w in range(3):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 2 + w))(keys)
        new = np.asarray(continue_tokens(model, params, prefix, have[:, -6:], 4, step_keys, top_k=5))
        pieces.append(new)
        have = np.concatenate([have, new], axis=1)
    np.testing.assert_array_equal(scanned, np.concatenate(pieces, axis=1))
