"""The two-optimizer GAN step shared by the VAE-GAN (§4.1) and the MusicGen codec (§6).

`TrainState.params = {"generator", "discriminator"}` (plus `"generator_state"` for a generator
with non-gradient variables, e.g. EMA codebooks) and `opt_state` holds one AdamW state per network.
One jitted step, each network run forward once: the generator under `jax.vjp`, the
discriminator on `concat([real, stop-gradient fake])` under `jax.vjp`. Its outputs are pulled back
twice: the discriminator loss to the discriminator's parameters, and the generator's
adversarial + feature-matching loss to the fake audio, whose gradient is pulled back through the
generator together with the task's reconstruction loss. With `train.gan_updates="simultaneous"`
both networks step from the same discriminator forward (saves a third of the discriminator's
compute and compile time, which dominates on CPU); "alternating" steps D first and runs the updated
D again for G, as HiFi-GAN and audiocraft do.

`loss.adversarial_loss`: "lsgan" (HiFi-GAN: D (D(x) − 1)² + D(G(z))², G (D(G(z)) − 1)²) or "hinge"
(audiocraft: D relu(1 − D(x)) + relu(1 + D(G(z))), G −D(G(z))), each a mean over its logits.
`loss.reduction`: "mean" over sub-discriminators, feature matching L1 averaged over each one's layers
(audiocraft's normalised `AdversarialLoss`) or "sum" over sub-discriminators and layers (HiFi-GAN).
`loss.balancer`: the generator's output losses (the stage's `balanced_losses`, adversarial, feature
matching) go through audiocraft's balancer (melody_jax/training/balancer.py), their weights acting as
gradient shares; its norm averages live in `opt_state["balancer"]`.
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import optax

from melody_jax.frozen.stage_models import gan_params
from melody_jax.models import discriminators
from melody_jax.tasks.sources import SourcedTask, prepared_audio
from melody_jax.training import accumulate, balancer
from melody_jax.training.config import one_of, positive, require
from melody_jax.training.optim import make_optimizer
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch, Metrics

Outputs = list[tuple[jax.Array, list[jax.Array]]]


def _halves(outs: Outputs) -> tuple[Outputs, Outputs]:
    """Discriminator outputs of `concat([real, fake])` split into (real, fake) outputs."""
    split = lambda x: jnp.split(x, 2, axis=0)  # noqa: E731
    real, fake = [], []
    for logits, feats in outs:
        (lr, lf), pairs = split(logits), [split(f) for f in feats]
        real.append((lr, [p[0] for p in pairs]))
        fake.append((lf, [p[1] for p in pairs]))
    return real, fake


ADVERSARIAL_LOSSES = ("lsgan", "hinge")
REDUCTIONS = ("mean", "sum")
GAN_UPDATES = ("simultaneous", "alternating")


def discriminator_loss(real: Outputs, fake: Outputs, kind: str = "lsgan", reduction: str = "mean"
                       ) -> tuple[jax.Array, Metrics]:
    """LSGAN E(D(x) − 1)² + E D(G(z))², or hinge E relu(1 − D(x)) + E relu(1 + D(G(z))), per
    sub-discriminator; their mean or sum. The metrics are means either way."""
    if kind == "hinge":
        r = jnp.stack([jnp.mean(jax.nn.relu(1.0 - lr)) for lr, _ in real])
        f = jnp.stack([jnp.mean(jax.nn.relu(1.0 + lf)) for lf, _ in fake])
    else:
        r = jnp.stack([jnp.mean((lr - 1.0) ** 2) for lr, _ in real])
        f = jnp.stack([jnp.mean(lf**2) for lf, _ in fake])
    reduce = jnp.sum if reduction == "sum" else jnp.mean
    return reduce(r + f), {"d_real": jnp.mean(r), "d_fake": jnp.mean(f)}


def generator_adversarial(real: Outputs, fake: Outputs, kind: str = "lsgan", reduction: str = "mean"
                          ) -> tuple[jax.Array, jax.Array]:
    """(adversarial: LSGAN E(D(G(z)) − 1)² or hinge −E D(G(z)); feature-matching L1 per layer), reduced
    over sub-discriminators (and, for feature matching, their layers) by mean or sum."""
    reduce = jnp.sum if reduction == "sum" else jnp.mean
    adv = reduce(jnp.stack([-jnp.mean(lf) if kind == "hinge" else jnp.mean((lf - 1.0) ** 2) for lf, _ in fake]))
    fm = reduce(jnp.stack([
        reduce(jnp.stack([jnp.mean(jnp.abs(jax.lax.stop_gradient(a) - b)) for a, b in zip(fr, ff)]))
        for (_, fr), (_, ff) in zip(real, fake)]))
    return adv, fm


class GANTask(SourcedTask):
    """A stage whose generator is trained against `config.discriminator` with `config.loss`
    weights `adversarial` and `feature_matching`. Subclasses give the generator's init and its
    reconstruction (with any non-adversarial losses already weighted)."""

    sources = ("prepared_audio",)
    generator_state_collections: tuple[str, ...] = ()  # mutable non-gradient variables, e.g. ("vq_stats",)
    balanced_loss_names: tuple[str, ...] = ()  # the keys of `balanced_losses`

    @abc.abstractmethod
    def init_generator(self, rng: jax.Array) -> dict[str, Any]:
        """Boxed variables of the generator: `{"params": ..., <collection>: ...}`."""

    @abc.abstractmethod
    def reconstruct(self, params: Any, state: Any, batch: Batch, rng: jax.Array, train: bool
                    ) -> tuple[jax.Array, jax.Array, jax.Array, Metrics, Any]:
        """(fake `[B, T]`, real `[B, T]`, weighted reconstruction loss, metrics, new generator state)."""

    def validate_gan(self) -> None:
        """The data and the GAN step's options (called by each stage's `validate`)."""
        c = self.config
        self.check_data()
        one_of(c, "loss.adversarial_loss", ADVERSARIAL_LOSSES)
        one_of(c, "loss.reduction", REDUCTIONS)
        one_of(c, "train.gan_updates", GAN_UPDATES)
        positive(c, "loss.balancer_total_norm")
        require(0.0 <= c.loss.balancer_ema_decay < 1.0,
                f"config.loss.balancer_ema_decay={c.loss.balancer_ema_decay} must lie in [0, 1)")
        require(accumulate.steps(c) == 1 or (c.train.gan_updates == "simultaneous" and not c.loss.balancer),
                f"config.train.grad_accum_steps={accumulate.steps(c)} needs train.gan_updates='simultaneous' and "
                "no loss.balancer (both need the whole batch's gradients at once)")

    def balanced_losses(self, fake: jax.Array, real: jax.Array) -> dict[str, jax.Array]:
        """Unweighted losses that reach the generator only through `fake`, by `config.loss` name; with
        `loss.balancer` on they go through the balancer and `reconstruct` leaves them out of its loss."""
        return {}

    @property
    def balancing(self) -> bool:
        return bool(self.config.loss.balancer)

    def _reduction(self) -> tuple[str, str]:
        w = self.config.loss
        return w.adversarial_loss, w.reduction

    @property
    def discriminator(self) -> discriminators.Discriminators:
        return discriminators.build(self.config.discriminator)

    def crop_samples(self) -> int:
        return int(round(self.config.data.crop_seconds * self.config.data.sample_rate))

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        return gan_params(self.init_generator, self.discriminator, self.crop_samples(),
                          self.generator_state_collections, rng)

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config.optim, self.config.train.num_steps)

    def init_state(self, rng: jax.Array) -> TrainState:
        params = self.init_params(rng)
        opt = self.optimizer()
        opt_state = {k: opt.init(params[k]) for k in ("generator", "discriminator")}
        if self.balancing:
            opt_state["balancer"] = balancer.init_state(self._balancer_weights())
        return TrainState.create(params, opt_state)

    def _balancer_weights(self) -> dict[str, float]:
        w = self.config.loss
        return {n: float(w[n]) for n in (*self.balanced_loss_names, "adversarial", "feature_matching")}

    def _balanced_fake_grad(self, outs: Outputs, fake_pull, fake: jax.Array, real: jax.Array, state: dict
                            ) -> tuple[jax.Array, jax.Array, Metrics, dict]:
        """The balancer's gradient for the fake audio: (gradient, effective loss, metrics, new state)."""
        kind, reduction = self._reduction()
        losses, grads = {}, {}
        for i, name in enumerate(("adversarial", "feature_matching")):
            part = lambda o, i=i: generator_adversarial(*_halves(o), kind, reduction)[i]  # noqa: E731
            losses[name], cotangent = jax.value_and_grad(part)(outs)
            grads[name] = fake_pull(cotangent)
        values, pull = jax.vjp(lambda f: self.balanced_losses(f, real), fake)
        for name in self.balanced_loss_names:
            losses[name] = values[name]
            (grads[name],) = pull({n: jnp.asarray(n == name, v.dtype) for n, v in values.items()})
        w = self.config.loss
        grad, state, scales = balancer.balance(grads, self._balancer_weights(), state, total_norm=w.balancer_total_norm,
                                               ema_decay=w.balancer_ema_decay, per_example=True)
        effective = sum(scales[n] * losses[n] for n in losses)
        metrics = {"g_adv": losses["adversarial"], "g_fm": losses["feature_matching"],
                   **{f"balancer_scale_{n}": s for n, s in scales.items()}}
        return grad, effective, metrics, state

    def _weighted_adversarial(self, outs: Outputs) -> tuple[jax.Array, Metrics]:
        w = self.config.loss
        adv, fm = generator_adversarial(*_halves(outs), *self._reduction())
        return w.adversarial * adv + w.feature_matching * fm, {"g_adv": adv, "g_fm": fm}

    def _discriminator_pass(self, p: Any, gen_state: Any, batch: Batch, rng: jax.Array):
        """The generator's forward (with its pullback) and the discriminator's loss and gradients on
        real and generated audio: what every update mode starts from."""
        def generate(g_params):
            fake, real, rec, metrics, new_gen_state = self.reconstruct(g_params, gen_state, batch, rng, True)
            return (fake, rec), (real, metrics, new_gen_state)

        (fake, rec), pullback, (real, metrics, new_gen_state) = jax.vjp(generate, p["generator"], has_aux=True)
        real, fake_sg = jax.lax.stop_gradient(real), jax.lax.stop_gradient(fake)
        outs, d_pullback = jax.vjp(self._d_apply, p["discriminator"], jnp.concatenate([real, fake_sg], axis=0))
        d_objective = lambda o: discriminator_loss(*_halves(o), *self._reduction())  # noqa: E731
        (d_loss, d_metrics), d_cotangent = jax.value_and_grad(d_objective, has_aux=True)(outs)
        d_grads = d_pullback(d_cotangent)[0]
        metrics = {**metrics, **d_metrics, "g_rec": rec, "d_loss": d_loss}
        return fake, real, fake_sg, rec, pullback, outs, d_pullback, d_grads, metrics, new_gen_state

    def _d_apply(self, d_params: Any, audio: jax.Array) -> Outputs:
        return self.discriminator.apply({"params": d_params}, audio)

    def _gradients(self, p: Any, gen_state: Any, batch: Batch, rng: jax.Array):
        """(generator grads, discriminator grads, metrics, new generator state) of one (micro-)batch,
        both against the same discriminator (simultaneous updates, no balancer)."""
        _, _, _, rec, pullback, outs, d_pullback, d_grads, metrics, new_gen_state = self._discriminator_pass(
            p, gen_state, batch, rng)
        (adv, adv_metrics), g_cotangent = jax.value_and_grad(self._weighted_adversarial, has_aux=True)(outs)
        fake_grad = jnp.split(d_pullback(g_cotangent)[1], 2, axis=0)[1]
        (g_grads,) = pullback((fake_grad, jnp.ones_like(rec)))
        return g_grads, d_grads, {**metrics, **adv_metrics, "loss": rec + adv}, new_gen_state

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        """Both networks step from the same discriminator forward; with `train.grad_accum_steps` = k,
        both gradients are means over k micro-batches (a generator state, e.g. EMA codebooks, is
        updated micro-batch after micro-batch). D-then-G updates and the balancer take `_recipe_step`."""
        if self.config.train.gan_updates == "alternating" or self.balancing:
            return self._recipe_step(state, batch, rng)
        p, opt = state.params, self.optimizer()

        def micro(gen_state, b, r):
            g_grads, d_grads, metrics, new_gen_state = self._gradients(p, gen_state, b, r)
            return new_gen_state, (g_grads, d_grads, metrics)

        new_gen_state, (g_grads, d_grads, metrics) = accumulate.accumulate(
            micro, p.get("generator_state"), batch, rng, accumulate.steps(self.config))
        d_updates, d_opt = opt.update(d_grads, state.opt_state["discriminator"], p["discriminator"])
        g_updates, g_opt = opt.update(g_grads, state.opt_state["generator"], p["generator"])
        params = {**p, "generator": optax.apply_updates(p["generator"], g_updates),
                  "discriminator": optax.apply_updates(p["discriminator"], d_updates)}
        return self._finish(state, params, new_gen_state, {"generator": g_opt, "discriminator": d_opt},
                            g_grads, d_grads, metrics)

    def _recipe_step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        """One whole-batch step with D-then-G updates (`train.gan_updates="alternating"`: G against the
        updated D, as HiFi-GAN) and/or the loss balancer; validation refuses accumulation with them."""
        p, opt = state.params, self.optimizer()
        fake, real, fake_sg, rec, pullback, outs, d_pullback, d_grads, metrics, new_gen_state = (
            self._discriminator_pass(p, p.get("generator_state"), batch, rng))
        d_updates, d_opt = opt.update(d_grads, state.opt_state["discriminator"], p["discriminator"])
        d_params = optax.apply_updates(p["discriminator"], d_updates)
        if self.config.train.gan_updates == "alternating":  # G against the updated D
            outs, audio_pullback = jax.vjp(lambda audio: self._d_apply(d_params, audio), jnp.concatenate([real, fake]))
            fake_pull = lambda cot: jnp.split(audio_pullback(cot)[0], 2, axis=0)[1]  # noqa: E731
        else:
            fake_pull = lambda cot: jnp.split(d_pullback(cot)[1], 2, axis=0)[1]  # noqa: E731
        opt_state = {"generator": None, "discriminator": d_opt}
        if self.balancing:
            fake_grad, adv, adv_metrics, opt_state["balancer"] = self._balanced_fake_grad(
                outs, fake_pull, fake_sg, real, state.opt_state["balancer"])
        else:
            (adv, adv_metrics), g_cotangent = jax.value_and_grad(self._weighted_adversarial, has_aux=True)(outs)
            fake_grad = fake_pull(g_cotangent)
        (g_grads,) = pullback((fake_grad, jnp.ones_like(rec)))
        g_updates, opt_state["generator"] = opt.update(g_grads, state.opt_state["generator"], p["generator"])
        params = {**p, "generator": optax.apply_updates(p["generator"], g_updates), "discriminator": d_params}
        return self._finish(state, params, new_gen_state, opt_state, g_grads, d_grads,
                            {**metrics, **adv_metrics, "loss": rec + adv})

    @staticmethod
    def _finish(state, params, new_gen_state, opt_state, g_grads, d_grads, metrics):
        if new_gen_state is not None:
            params["generator_state"] = new_gen_state
        g_norm, d_norm = optax.tree.norm(g_grads), optax.tree.norm(d_grads)
        metrics = {**metrics, "g_grad_norm": g_norm, "d_grad_norm": d_norm, "grad_norm": jnp.sqrt(g_norm**2 + d_norm**2)}
        return state.replace(params=params, opt_state=opt_state), metrics

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        """The generator's total loss against the current discriminator (what its step minimises)."""
        fake, real, rec, metrics, _ = self.reconstruct(params["generator"], params.get("generator_state"), batch,
                                                       rng, train)
        outs = self.discriminator.apply({"params": params["discriminator"]}, jnp.concatenate([real, fake], axis=0))
        adv, adv_metrics = self._weighted_adversarial(outs)
        if self.balancing:  # the losses the balancer weighs, at their raw weights here
            rec = rec + sum(self.config.loss[n] * v for n, v in self.balanced_losses(fake, real).items())
        return rec + adv, {**metrics, **adv_metrics}

    def describe(self, params: Any) -> dict[str, int]:
        """Parameter count per network and, one level down, per generator part."""
        count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
        out = {f"generator/{k}": count(v) for k, v in params["generator"].items()}
        return {**out, "discriminator": count(params["discriminator"])}

    # --- data: crops of a prepared dataset at `data.sample_rate`, held out from `data.eval_split` ----
    def batches(self, mesh, split: str):
        return prepared_audio(self.config, mesh, split, with_text=False)
