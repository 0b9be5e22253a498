"""model.scan_layers: every stack as one nn.scan gives the unscanned model's outputs; checkpoints convert
between the layouts; model.attention_impl: the cuDNN kernel is refused in one line where there is none."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from melody_jax.models.dpd import DPD
from melody_jax.models.musicgen_lm import MusicGenLM
from melody_jax.pipelines.musicgen_sampling import generate
from melody_jax.tasks.musicgen import MusicGenTask
from melody_jax.text.byte_tokenizer import tokenize
from melody_jax.training.errors import ConfigError, WorkdirError
from melody_jax.training.layer_layout import relayout
from melody_jax.tasks.registry import get_task
from melody_jax.training import config as config_lib
from melody_jax.training import init_from
from melody_jax.training.checkpoint import Checkpointer, param_signature
from melody_jax.training.loop import init_sharded_state, restore_checkpoint, train
from melody_jax.training.sharding import activate
from tests.helpers import stage_config, stage_layout, toy_config


def stacked(tree, *names: str):
    """Unscanned parameters → scanned, independently of `relayout`: wherever `layer_0…layer_n` sit, `layers/…`
    stacked on a leading axis (the DPD's: `block_i` → `blocks`, `roformer_j` → `roformer`)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: stacked(v, *names) for k, v in tree.items()}
    for name, into in {"layer": "layers", **{n: n + "s" for n in names}, "roformer": "roformer"}.items():
        parts = [k for k in out if k.startswith(f"{name}_")]
        if parts:
            blocks = [out.pop(f"{name}_{i}") for i in range(len(parts))]
            out[into] = jax.tree.map(lambda *xs: np.stack(xs), *blocks)
    return out


def test_scanned_semantic_lm_gives_the_unscanned_loss():
    mesh_fields = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    plain_cfg = stage_config("semantic_lm", mesh_fields)
    scan_cfg = stage_config("semantic_lm", {"model.scan_layers": True, **mesh_fields})
    task, mesh, rules, _, shardings = stage_layout(plain_cfg)
    scan_task, _, _, scan_abstract, _ = stage_layout(scan_cfg)
    with activate(mesh, rules):
        params = init_sharded_state(task, shardings, jax.random.key(0)).params
        layers = plain_cfg.model.num_layers
        scan_params = stacked(params)
        assert jax.tree.structure(scan_params) == jax.tree.structure(scan_abstract.params)
        for got, want in zip(jax.tree.leaves(scan_params), jax.tree.leaves(scan_abstract.params)):
            assert got.shape == want.shape
        batch = next(iter(task.train_iterator(mesh)))
        rng = jax.random.key(1)
        loss, _ = jax.jit(task.loss)(params, batch, rng)
        scan_loss, _ = jax.jit(scan_task.loss)(scan_params, batch, rng)
    assert layers >= 2
    np.testing.assert_allclose(float(scan_loss), float(loss), rtol=1e-5, atol=1e-5)


def test_scanned_mulan_towers_give_the_unscanned_embeddings():
    fields = {"data.path": "unused", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    plain_cfg, scan_cfg = stage_config("mulan", fields), stage_config("mulan", {"model.scan_layers": True, **fields})
    task, mesh, rules, _, shardings = stage_layout(plain_cfg)
    scan_task, _, _, scan_abstract, _ = stage_layout(scan_cfg)
    assert min(plain_cfg.model.audio_layers, plain_cfg.model.text_layers) >= 2
    audio = 0.1 * jax.random.normal(jax.random.key(1), (4, int(plain_cfg.data.crop_seconds * plain_cfg.data.sample_rate)))
    tokens = jax.random.randint(jax.random.key(2), (4, 12), 1, 200)
    mask = jnp.arange(12)[None] < jnp.array([[12], [7], [3], [12]])
    with activate(mesh, rules):
        params = init_sharded_state(task, shardings, jax.random.key(0)).params
        scan_params = stacked(params)
        assert jax.tree.structure(scan_params) == jax.tree.structure(scan_abstract.params)
        out = jax.jit(task.model.apply)({"params": params}, audio, tokens, mask)
        scan_out = jax.jit(scan_task.model.apply)({"params": scan_params}, audio, tokens, mask)
    for a, b in zip(scan_out, out):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_scanned_conformer_gives_the_unscanned_outputs_and_hidden_states():
    fields = {"data.path": "unused", "mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}
    plain_cfg, scan_cfg = stage_config("ssl", fields), stage_config("ssl", {"model.scan_layers": True, **fields})
    task, mesh, rules, _, shardings = stage_layout(plain_cfg)
    scan_task, _, _, scan_abstract, _ = stage_layout(scan_cfg)
    layers = plain_cfg.model.num_layers
    assert layers >= 2
    audio = 0.1 * jax.random.normal(jax.random.key(1), (2, task.crop_samples))
    with activate(mesh, rules):
        params = init_sharded_state(task, shardings, jax.random.key(0)).params
        scan_params = {k: v for k, v in params.items() if not k.startswith("blocks_")}
        scan_params["stack"] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs),
                                                       *[params[f"blocks_{i}"] for i in range(layers)])}
        assert jax.tree.structure(scan_params) == jax.tree.structure(scan_abstract.params)
        rngs = {"mask": jax.random.key(3), "gumbel": jax.random.key(4)}
        forward = lambda model, p: model.apply({"params": p}, audio, train=False, rngs=rngs)["context"]  # noqa: E731
        hidden = lambda model, p: model.apply({"params": p}, audio, layers // 2,  # noqa: E731
                                              method=type(model).hidden_states)
        for fn in (forward, hidden):
            np.testing.assert_allclose(np.asarray(jax.jit(fn, static_argnums=0)(scan_task.model, scan_params)),
                                       np.asarray(jax.jit(fn, static_argnums=0)(task.model, params)),
                                       rtol=1e-5, atol=1e-5)


def test_scanned_musicgen_gives_the_unscanned_logits_cache_and_greedy_codes():
    """The LM's and the text encoder's blocks scanned: same logits, same greedy CFG codes (decoded with the
    KV cache stacked over layers); parameters converted by `relayout` (the converter's and restore's)."""
    config = stage_config("musicgen", {"model.text_layers": 2})
    plain, scan = MusicGenTask(config), MusicGenTask(stage_config("musicgen", {"model.text_layers": 2,
                                                                               "model.scan_layers": True}))
    params = nn.meta.unbox(jax.jit(plain.init_params)(jax.random.key(0)))
    scan_shapes = nn.meta.unbox(jax.eval_shape(scan.init_params, jax.random.key(0)))
    scan_params = relayout(params, scan_shapes)
    assert param_signature(scan_params) == param_signature(scan_shapes)
    assert scan_params["layers"]["self_attn"]["query"]["kernel"].shape[0] == config.model.num_layers >= 2
    np.testing.assert_array_equal(scan_params["text_encoder"]["encoder"]["layers"]["mlp_norm"]["scale"][1],
                                  params["text_encoder"]["encoder"]["layer_1"]["mlp_norm"]["scale"])
    m = config.model
    rng = np.random.default_rng(0)
    codes = rng.integers(0, m.codebook_size, (2, m.num_codebooks, config.data.frames))
    seq = plain.pattern.build(codes, m.codebook_size)
    tokens, mask = tokenize(["a calm piano", "drums"], m.max_text_length)
    chroma = rng.random((2, m.melody_frames, 12)).astype(np.float32)
    out, caches = {}, {}
    for name, task, p in (("plain", plain, params), ("scan", scan, scan_params)):
        def decode_cache(task=task, p=p):  # what the sampler allocates
            conds = task.model.apply({"params": p}, tokens, mask, chroma, method=MusicGenLM.conditions)
            return task.model.clone(decode=True).init(jax.random.key(0), seq, *conds, method=MusicGenLM.logits)
        caches[name] = jax.eval_shape(decode_cache)["cache"]
        full = jax.jit(task.model.apply)({"params": p}, seq, tokens, mask, chroma)
        greedy = generate(task.model, p, task.pattern, tokens, mask, 12, jax.random.key(0), chroma=chroma,
                          cfg_scale=3.0, temperature=0.0)
        out[name] = np.asarray(full), np.asarray(greedy.codes)
    for kind in ("self_attn", "cross_attn"):  # one cache, stacked over the layers
        for key, leaf in caches["scan"]["layers"][kind].items():
            assert leaf.shape == (m.num_layers,) + caches["plain"]["layers_0"][kind][key].shape, key
    np.testing.assert_allclose(out["scan"][0], out["plain"][0], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["scan"][1], out["plain"][1])
    assert len(np.unique(out["plain"][1])) > 4  # not a constant sequence


def adam(state):
    """The ScaleByAdamState of clip_by_global_norm → adamw (mu, nu shaped like the parameters)."""
    return state.opt_state[1][0]


def test_scanned_dpd_gives_the_unscanned_velocities():
    """Blocks of merge lengths (8, 4, 2, 4, 8) as one scan switching between 3 coarse paths, Roformer
    layers nested, the parallel SRU, remat, CFG rows: the unscanned model's output (1e-5)."""
    kw = dict(hidden_dim=16, num_blocks=5, segment_length=8, num_heads=2, roformer_layers=2, mlp_dim=32, angle_dim=8,
              vocab_size=12)
    plain, scan = DPD(**kw), DPD(**kw, scan_layers=True, remat=True)
    assert plain.resolved_merge_lengths() == (8, 4, 2, 4, 8)
    keys = jax.random.split(jax.random.key(1), 3)
    args = (jax.random.normal(keys[0], (4, 20, 16)), jax.random.uniform(keys[1], (4, 20), maxval=np.pi / 2),
            jax.random.randint(keys[2], (4, 5), 0, 12), jnp.array([False, True, False, True]))
    rng = np.random.default_rng(0)  # random parameters of the model's shapes: no init to compile
    params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32),
                          nn.meta.unbox(jax.eval_shape(plain.init, jax.random.key(0), *args[:3])["params"]))
    boxed = jax.eval_shape(scan.init, jax.random.key(0), *args[:3])["params"]
    spec = nn.get_partition_spec(boxed)["blocks"]["roformer"]["self_attn"]["query"]["kernel"]
    assert spec == P("layers", "sublayers", "embed", "heads", "kv")  # distinct names: the nested stack shards
    nn.logical_to_mesh(nn.get_partition_spec(boxed), [("embed", "fsdp")])
    scan_shapes = nn.meta.unbox(boxed)
    scan_params = stacked(params, "block")
    assert jax.tree.structure(scan_params) == jax.tree.structure(scan_shapes)
    assert scan_params["blocks"]["roformer"]["mlp"]["fc1"]["kernel"].shape[:2] == (5, 2)
    assert sum(x.size for x in jax.tree.leaves(scan_params)) == plain.param_count()
    np.testing.assert_allclose(np.asarray(jax.jit(scan.apply)({"params": scan_params}, *args)),
                               np.asarray(jax.jit(plain.apply)({"params": params}, *args)), rtol=1e-5, atol=1e-5)


def write_checkpoint(config, workdir) -> None:
    """Step 1 of `config` as the loop writes it: one optimizer update (gradients sin p) from the init, an EMA."""
    task, mesh, rules, abstract, shardings = stage_layout(config)
    with activate(mesh, rules):
        def step(state):
            grads = jax.tree.map(jnp.sin, state.params)
            updates, opt_state = task.optimizer().update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                 ema=jax.tree.map(lambda p: 0.5 * p, params))

        state = jax.jit(step, out_shardings=shardings)(init_sharded_state(task, shardings, jax.random.key(0)))
        ckpt = Checkpointer(str(workdir), keep=1, every=1)
        ckpt.save(1, state, {}, {"stage": config.stage, "param_signature": param_signature(abstract.params),
                                 "seed": config.seed, "ema": True}, force=True)
        ckpt.wait()
        ckpt.close()
    (workdir / "config.json").write_text(config_lib.to_json(config))


@pytest.mark.parametrize("written", [True, False])
def test_checkpoint_restores_and_initialises_in_the_other_layout(tmp_path, written):
    """A toy LM checkpoint written with scan_layers=`written`: resuming and `init_from` with the other value
    give its parameters, EMA and Adam moments with the layers unstacked (or stacked), exactly."""
    fields = {"train.ema_decay": 0.9}
    write_checkpoint(toy_config({"model.scan_layers": written, **fields}), tmp_path)
    _, mesh, rules, saved_abstract, _ = stage_layout(toy_config({"model.scan_layers": written, **fields}))
    config = toy_config({"model.scan_layers": not written, "train.init_from": str(tmp_path), **fields})
    task, _, _, abstract, shardings = stage_layout(config)
    with activate(mesh, rules):
        ckpt = Checkpointer(str(tmp_path), keep=1, every=1)
        saved, _ = ckpt.restore(1, saved_abstract)
        state, _, _ = restore_checkpoint(ckpt, 1, abstract, config, "workdir")
        ckpt.close()
        source = init_from.check(config, abstract.params)
        fresh = init_sharded_state(task, shardings, jax.random.key(5))
        started = init_from.load(source, fresh, abstract, config, shardings)
    unstacked = (lambda t: t) if written else stacked  # the test's own stacking of `layer_i` into `layers`
    restacked = stacked if written else (lambda t: t)
    pairs = [(state.params, saved.params), (state.ema, saved.ema), (started.params, saved.ema),
             (adam(state).mu, adam(saved).mu), (adam(state).nu, adam(saved).nu)]
    for got, want in pairs:
        got, want = restacked(jax.device_get(got)), unstacked(jax.device_get(want))
        assert jax.tree.structure(got) == jax.tree.structure(want)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_array_equal(a, b)
    for leaf, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(abstract.params)):
        assert leaf.sharding == want.sharding


def test_scanned_checkpoint_of_another_depth_is_refused_in_one_line(tmp_path):
    write_checkpoint(toy_config({"model.scan_layers": True}), tmp_path)
    with pytest.raises(WorkdirError, match=r"different model: parameter layer_0/attn/key/kernel has shape None there "
                                           r"and \[64, 4, 16\] in this config"):
        train(get_task(toy_config({"train.num_steps": 2, "model.num_layers": 3})), str(tmp_path))


def test_cudnn_attention_is_refused_on_a_backend_without_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^config.model.attention_impl='cudnn' needs a GPU with cuDNN; this "
                                          r"backend is cpu \(use 'xla'\)$"):
        train(get_task(toy_config({"model.attention_impl": "cudnn"})), str(tmp_path))
    with pytest.raises(ConfigError, match=r"config.model.attention_impl='flash' must be one of \('xla', 'cudnn'\)"):
        train(get_task(toy_config({"model.attention_impl": "flash"})), str(tmp_path))
