"""The DPD network: shapes, parameter count formula, logical axes, CFG branches, sharding, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from melody_jax.diffusion.guidance import classifier_free_guidance
from melody_jax.diffusion.samplers import generate
from melody_jax.models.dpd import DPD, default_merge_lengths, guidance_conditions, velocity_fn
from melody_jax.training import sharding

B, L, T_ST = 4, 10, 5
TINY = dict(hidden_dim=16, num_blocks=3, segment_length=4, num_heads=2, roformer_layers=1,
            mlp_dim=32, angle_dim=8, vocab_size=12)


def inputs(seed=0, batch=B):
    kz, kd, kt = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(kz, (batch, L, 16)),
            jax.random.uniform(kd, (batch, L), maxval=np.pi / 2),
            jax.random.randint(kt, (batch, T_ST), 0, TINY["vocab_size"]))


@pytest.fixture(scope="module")
def tiny():
    model = DPD(**TINY)
    variables = jax.jit(model.init)(jax.random.key(0), *inputs())
    return model, variables, jax.jit(model.apply)


def count(tree):
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree))))


def test_merge_lengths():
    assert default_merge_lengths(64, 8) == (64, 32, 16, 8, 8, 16, 32, 64)
    assert default_merge_lengths(4, 3) == (4, 2, 4)
    with pytest.raises(ValueError, match="merge_lengths"):
        DPD(**TINY, merge_lengths=(4, 3, 4)).resolved_merge_lengths()


def test_shapes_params_and_logical_axes(tiny):
    model, variables, apply = tiny
    v = apply(variables, *inputs(1))
    assert v.shape == (B, L, 16) and v.dtype == jnp.float32 and bool(jnp.isfinite(v).all())
    assert count(variables) == model.param_count()
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(x.value.dtype == jnp.float32 for x in leaves)


def test_paper_param_count_by_eval_shape():
    model = DPD()
    z, d, t = jnp.zeros((1, 2500, 16)), jnp.zeros((1, 2500)), jnp.zeros((1, 250), jnp.int32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), z, d, t)
    assert count(shapes) == model.param_count() == 295_582_224  # paper: 296.6M (0.3 % off)
    assert jax.eval_shape(model.apply, shapes, z, d, t).shape == (1, 2500, 16)


def test_inputs_matter_and_uncond_ignores_tokens(tiny):
    model, variables, apply = tiny
    z, d, t = inputs(2)
    other = (t + 1) % TINY["vocab_size"]
    base = apply(variables, z, d, t)
    assert float(jnp.abs(apply(variables, z, d * 0.5, t) - base).max()) > 1e-3
    assert float(jnp.abs(apply(variables, z, d, other) - base).max()) > 1e-3
    off = jnp.ones(B, bool)
    np.testing.assert_allclose(apply(variables, z, d, t, off), apply(variables, z, d, other, off),
                               rtol=0, atol=1e-6)
    # A mixed mask equals each example run all-conditional or all-unconditional.
    mask = jnp.array([True, False, False, True])
    mixed = apply(variables, z, d, t, mask)
    expect = jnp.where(mask[:, None, None], apply(variables, z, d, t, off), base)
    np.testing.assert_allclose(mixed, expect, rtol=0, atol=1e-5)
    np.testing.assert_allclose(apply(variables, z, d, t, jnp.zeros(B, bool)), base, rtol=0, atol=1e-5)


def test_remat_sequential_sru_and_bfloat16_agree(tiny):
    model, variables, apply = tiny
    args = inputs(3)
    base = apply(variables, *args)
    sequential = jax.jit(DPD(**TINY, parallel_sru=False).apply)(variables, *args)
    np.testing.assert_allclose(sequential, base, rtol=1e-4, atol=1e-4)

    def loss(m, params):
        return jnp.mean(m.apply(params, *args) ** 2)

    grad = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)
    for a, b in zip(jax.tree.leaves(grad(DPD(**TINY, remat=True), variables)),
                    jax.tree.leaves(grad(model, variables))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    low = jax.jit(DPD(**TINY, dtype=jnp.bfloat16).apply)(variables, *args)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - base).mean()) < 0.1 * float(jnp.abs(base).mean())


def test_sharded_init_and_apply_match_unsharded(tiny):
    model, variables, apply = tiny
    args = inputs(4)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    with sharding.activate(mesh, rules):
        abstract = jax.eval_shape(model.init, jax.random.key(0), *args)
        specs = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
        params = jax.jit(model.init, out_shardings=specs)(jax.random.key(0), *args)
        batch = [jax.device_put(a, sharding.batch_sharding(mesh, a.ndim)) for a in args]
        out = jax.jit(model.apply)(params, *batch)
    kernel = params["params"]["block_0"]["sru_0"]["forward"]["proj"]["kernel"].value
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    np.testing.assert_allclose(out, apply(variables, *args), rtol=1e-4, atol=1e-4)


def test_cfg_sampling_with_the_model(tiny):
    model, variables, _ = tiny
    _, _, tokens = inputs(5)

    @jax.jit
    def sample(variables, key, tokens):
        vfn = classifier_free_guidance(velocity_fn(model, variables), 2.5)
        return generate(vfn, key, guidance_conditions(tokens), (B, L, 16), num_steps=3)

    z = sample(variables, jax.random.key(0), tokens)
    assert z.shape == (B, L, 16) and float(jnp.abs(z).max()) <= 1.0 and bool(jnp.isfinite(z).all())
    assert sample._cache_size() == 1
