"""Gradient accumulation: k micro-batches in one jitted step give the whole batch's update, with less memory."""
import jax
import numpy as np
import pytest

from melody_jax.tasks.vae_gan import VAEGANTask
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import init_sharded_state, sharded_abstract_state
from melody_jax.training.plan import plan_train_step
from melody_jax.training.sharding import activate, make_mesh, rules_from_config
from tests.helpers import stage_config, stage_layout, toy_config, train_and_restore

pytestmark = pytest.mark.slow  # stage steps compared, one by one

# Plain SGD at lr 1 without clipping: the step's change of the parameters is the gradient itself,
# so the comparison sees the accumulated gradient (Adam's first step, ≈ lr·sign(g), would hide it).
SGD = {"optim.name": "sgd", "optim.b1": 0.0, "optim.lr": 1.0, "optim.grad_clip_norm": 0.0, "optim.schedule": "constant",
       "optim.warmup_steps": 0}


def assert_close(a, b):
    """float32 to 1e-6: absolute for |x| <= 1, relative above (a sum over 32 examples in another order)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def max_diff(a, b):
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_toy_lm_accumulated_step_equals_whole_batch(tmp_path):
    fields = {"train.num_steps": 1, "train.batch_size": 32, "train.eval_every": 1000, **SGD}
    _, _, _, whole = train_and_restore(toy_config(fields), str(tmp_path / "whole"))
    _, _, _, micro = train_and_restore(toy_config({"train.grad_accum_steps": 4, **fields}), str(tmp_path / "micro"))
    assert_close(micro, whole)
    task, mesh, rules, _, shardings = stage_layout(toy_config(fields))
    with activate(mesh, rules):  # the loop's initial state (its init key)
        start = jax.device_get(init_sharded_state(task, shardings, jax.random.split(jax.random.key(0), 3)[0]).params)
    assert max_diff(whole, start) > 1e-2, "the step must move the parameters (else the test proves nothing)"


class MeanPosterior(VAEGANTask):
    """The VAE's posterior mean instead of a sample: the whole batch and the micro-batches would
    draw different noise (the step's randomness is per micro-batch), which is not what is compared."""

    def reconstruct(self, params, state, batch, rng, train):
        return super().reconstruct(params, state, batch, rng, False)


def test_vae_gan_accumulated_step_equals_whole_batch():
    fields = {"data.path": "unused", "data.crop_seconds": 0.1, "train.batch_size": 32, "mesh.data": 1, "mesh_devices": 1,
              "loss.stft_n_ffts": [512, 128], "loss.stft_hops": [128, 32], "loss.stft_wins": [256, 64], **SGD}
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    rules = rules_from_config([])
    audio = 0.3 * jax.random.normal(jax.random.key(1), (32, 2400))
    out = {}
    for k in (1, 4):
        task = MeanPosterior(stage_config("vae_gan", {"train.grad_accum_steps": k, **fields}))
        with activate(mesh, rules):
            rng = jax.random.key(0)
            _, shardings = sharded_abstract_state(task, mesh, rules, rng)
            state = init_sharded_state(task, shardings, rng)
            start = jax.device_get(state.params)
            new, metrics = jax.jit(task.train_step)(state, {"audio": audio}, jax.random.key(2))
        out[k] = jax.device_get((new.params, metrics))
    (p1, m1), (p4, m4) = out[1], out[4]
    assert_close(p4, p1)
    np.testing.assert_allclose(m4["d_loss"], m1["d_loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["g_grad_norm"], m1["g_grad_norm"], rtol=1e-5)
    assert max_diff(p1["generator"], start["generator"]) > 1e-2
    assert max_diff(p1["discriminator"], start["discriminator"]) > 1e-2


def test_plan_activation_memory_follows_the_micro_batch():
    """Toy LM tiny, batch 256 on 8 devices: 13.8 MiB activations/temp per device whole, 3.9 MiB in 4 micro-batches."""
    temp = {k: plan_train_step(get_task(toy_config({"train.batch_size": 256, "train.grad_accum_steps": k})))["temp_bytes"]
            for k in (1, 4)}
    assert temp[4] < 0.4 * temp[1], temp
