"""The GAN recipes of the papers: hinge and LSGAN, mean and sum reductions and the KL's, by hand;
audiocraft's loss balancer on a two-loss toy; the MS-STFT discriminator's slope; one GAN step with
the balancer and D-then-G updates."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.codec import get_config as codec_config
from configs.vae_gan import get_config as vae_gan_config
from melody_jax.models.discriminators import STFTDiscriminator
from melody_jax.models.vae_gan import Posterior
from melody_jax.tasks.gan import GANTask, discriminator_loss, generator_adversarial
from melody_jax.training import balancer
from melody_jax.training.errors import ConfigError
from tests.helpers import stage_config

# Two sub-discriminators: logits, then feature maps (one layer in the first, two in the second).
REAL = [(jnp.ones((2, 3)), [jnp.ones((2, 4))]), (jnp.full((2, 5), 0.5), [jnp.zeros((2, 2)), jnp.ones((2, 2))])]
FAKE = [(jnp.zeros((2, 3)), [jnp.zeros((2, 4))]), (jnp.full((2, 5), 0.5), [jnp.ones((2, 2)), jnp.ones((2, 2))])]


@pytest.mark.parametrize("kind, reduction, d_expected, g_expected", [
    # LSGAN D: D1 (1−1)² + 0² = 0, D2 (0.5−1)² + 0.5² = 0.5; G: D1 (0−1)² = 1, D2 0.25.
    ("lsgan", "mean", 0.25, 0.625), ("lsgan", "sum", 0.5, 1.25),
    # hinge D: D1 relu(1−1) + relu(1+0) = 1, D2 relu(0.5) + relu(1.5) = 2; G: D1 −0 = 0, D2 −0.5.
    ("hinge", "mean", 1.5, -0.25), ("hinge", "sum", 3.0, -0.5)])
def test_adversarial_losses_by_hand(kind, reduction, d_expected, g_expected):
    d_loss, parts = discriminator_loss(REAL, FAKE, kind, reduction)
    adv, fm = generator_adversarial(REAL, FAKE, kind, reduction)
    np.testing.assert_allclose([float(d_loss), float(adv)], [d_expected, g_expected], rtol=1e-6)
    # Feature matching, L1 per layer: D1 |1 − 0| = 1; D2 layers 1 and 0 → mean(1, mean(1, 0)) or 1 + 1 + 0.
    np.testing.assert_allclose(float(fm), 0.75 if reduction == "mean" else 2.0, rtol=1e-6)
    if kind == "hinge":  # the metrics are means over sub-discriminators either way
        np.testing.assert_allclose([float(parts["d_real"]), float(parts["d_fake"])], [0.25, 1.25], rtol=1e-6)


def test_kl_reductions_by_hand():
    mean = jnp.array([[[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]]] * 2)  # [B 2, L 3, latent 2]
    post = Posterior(mean, jnp.zeros_like(mean))  # KL per element = μ²/2: 0.5, 0, 0, 2, 0, 0
    np.testing.assert_allclose(float(post.kl("mean")), 2.5 / 6, rtol=1e-6)
    np.testing.assert_allclose(float(post.kl("sum")), 2.5, rtol=1e-6)  # summed per example, mean over batch


def test_presets_take_the_references_recipes():
    codec, small_codec = codec_config("paper").loss, codec_config("small").loss
    assert (codec.adversarial_loss, codec.reduction, codec.balancer) == ("hinge", "mean", True)
    assert (codec.balancer_total_norm, codec.balancer_ema_decay) == (1.0, 0.999)
    assert codec_config("paper").discriminator.stft_negative_slope == 0.3
    assert codec_config("base").train.gan_updates == "alternating"
    assert (small_codec.adversarial_loss, small_codec.balancer) == ("lsgan", False)
    vae = vae_gan_config("paper")
    assert (vae.loss.adversarial_loss, vae.loss.reduction, vae.train.gan_updates) == ("lsgan", "sum", "alternating")
    assert (vae_gan_config("tiny").loss.reduction, vae_gan_config("tiny").train.gan_updates) == ("mean", "simultaneous")


def test_balancer_gradient_shares_equal_the_weights():
    """Two losses of one output at scales 10⁶ apart: the balanced gradient splits 1 : 3 between them,
    its parts summing to total_norm, whatever either loss's scale."""
    y = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)), jnp.float32)
    weights = {"a": 1.0, "b": 3.0}

    def grads(scale_a):
        return {"a": jax.grad(lambda v: scale_a * 1e3 * jnp.sum(v**2))(y),
                "b": jax.grad(lambda v: 1e-3 * jnp.sum(jnp.abs(v - 1.0)))(y)}

    state = balancer.init_state(weights)
    for step in range(3):  # steady norms: the bias-corrected average is the norm itself at every step
        out, state, scales = balancer.balance(grads(1.0), weights, state, total_norm=1.0, ema_decay=0.999)
        parts = {n: float(balancer.gradient_norm(scales[n] * g)) for n, g in grads(1.0).items()}
        np.testing.assert_allclose([parts["a"], parts["b"]], [0.25, 0.75], rtol=1e-5)
    np.testing.assert_allclose(float(state["fix"]), 1 + 0.999 + 0.999**2, rtol=1e-6)
    rescaled, _, _ = balancer.balance(grads(1e6), weights, balancer.init_state(weights))
    first, _, _ = balancer.balance(grads(1.0), weights, balancer.init_state(weights))
    np.testing.assert_allclose(rescaled, first, rtol=1e-4, atol=1e-9)  # a loss's own scale does not matter


def test_balancer_averages_norms_over_steps():
    """With a norm that changes, the scale follows the EMA of past norms, not the current one."""
    weights = {"a": 1.0}
    state = balancer.init_state(weights)
    g = jnp.ones((1, 4))  # per-example norm 2
    for norm in (2.0, 6.0):
        _, state, scales = balancer.balance({"a": g * norm / 2.0}, weights, state, ema_decay=0.5)
    # EMA: (0.5·2 + 6) / (0.5 + 1) = 14 / 3.
    np.testing.assert_allclose(float(scales["a"]), 3 / 14, rtol=1e-6)


def test_stft_discriminator_slope_reaches_every_activation():
    """Slope 1 makes the network affine, so D(x) + D(−x) = 2·D(0); slope 0.3 breaks that."""
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 512)), jnp.float32)
    outs = {}
    for slope in (1.0, 0.3):
        disc = STFTDiscriminator(64, 16, 64, channels=4, negative_slope=slope)
        params = disc.init(jax.random.key(0), x)
        d = lambda a: disc.apply(params, a)[0]  # noqa: E731
        outs[slope] = np.abs(np.asarray(d(x) + d(-x) - 2 * d(jnp.zeros_like(x)))).max()
    assert outs[1.0] < 1e-4 and outs[0.3] > 1e-2, outs


class ToyGAN(GANTask):
    """A one-scale-one-shift generator against the tiny codec's discriminator: the GAN step's own cost."""

    name = "toy_gan"
    balanced_loss_names = ("l1",)

    def validate(self):
        self.validate_gan()

    def init_generator(self, rng):
        return {"params": {"scale": jnp.full((), 0.5), "shift": jnp.full((), 0.1)}}

    def reconstruct(self, params, state, batch, rng, train):
        real = batch["audio"]
        fake = params["scale"] * real + params["shift"]
        parts = self.balanced_losses(fake, real)
        rec = jnp.zeros(()) if self.balancing else self.config.loss.l1 * parts["l1"]
        return fake, real, rec, parts, None

    def balanced_losses(self, fake, real):
        return {"l1": jnp.mean(jnp.abs(fake - real))}


def test_gan_step_with_balancer_and_alternating_updates(tmp_path):
    """One step with audiocraft's recipe: the balancer's state holds the step's gradient norms, and
    D-then-G changes the generator's update but not the discriminator's."""
    overrides = {"data.path": str(tmp_path), "data.crop_seconds": 0.02, "discriminator.periods": "[2]",
                 "loss.adversarial_loss": "hinge", "loss.balancer": True}
    batch = {"audio": jnp.asarray(0.3 * np.random.default_rng(2).normal(size=(2, 640)), jnp.float32)}
    after = {}
    for updates in ("alternating", "simultaneous"):
        task = ToyGAN(stage_config("codec", {"train.gan_updates": updates, **overrides}))
        task.validate()
        state = jax.jit(lambda r: nn.meta.unbox(task.init_state(r)))(jax.random.key(0))  # noqa: B023
        after[updates], metrics = jax.jit(task.train_step)(state, batch, jax.random.key(1))
        assert all(np.isfinite(float(v)) for v in jax.tree.leaves(metrics))
        after[updates + "_metrics"] = metrics
    state = after["alternating"].opt_state["balancer"]
    assert float(state["fix"]) == 1.0 and set(state["total"]) == {"l1", "adversarial", "feature_matching"}
    np.testing.assert_allclose(float(state["total"]["l1"]), 0.5 / 640 * np.sqrt(640), rtol=1e-5)  # |∂ mean|f−r| / ∂f|
    a, s = (x.params for x in (after["alternating"], after["simultaneous"]))
    for x, y in zip(jax.tree.leaves(a["discriminator"]), jax.tree.leaves(s["discriminator"])):  # D: the same step
        np.testing.assert_array_equal(x, y)
    # The generator's adversarial gradient comes from the updated D: another norm, another gradient
    # (Adam's first step, ≈ lr·sign(g), hides it in the parameters).
    other = after["simultaneous"].opt_state["balancer"]["total"]
    assert abs(float(state["total"]["adversarial"]) / float(other["adversarial"]) - 1) > 1e-3
    assert float(state["total"]["l1"]) == float(other["l1"])
    assert float(after["alternating_metrics"]["g_grad_norm"]) != float(after["simultaneous_metrics"]["g_grad_norm"])
    with pytest.raises(ConfigError, match="gan_updates"):
        ToyGAN(stage_config("codec", {**overrides, "train.gan_updates": "both"})).validate()
