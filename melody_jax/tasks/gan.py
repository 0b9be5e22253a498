"""The two-optimizer GAN step shared by the VAE-GAN (§4.1) and the MusicGen codec (§6).

`TrainState.params = {"generator", "discriminator"}` (plus `"generator_state"` for a generator
with non-gradient variables, e.g. EMA codebooks) and `opt_state` holds one AdamW state per network.
One jitted step, each network run forward once: the generator under `jax.vjp`, the
discriminator on `concat([real, stop-gradient fake])` under `jax.vjp`. Its outputs are pulled back
twice: the LSGAN discriminator loss to the discriminator's parameters, and the generator's
adversarial + feature-matching loss to the fake audio, whose gradient is pulled back through the
generator together with the task's reconstruction loss. Both networks step from the same
discriminator forward [choice: HiFi-GAN steps D first and runs it again for G; the simultaneous
update saves a third of the discriminator's compute and compile time, which dominates on CPU].

Losses are means over sub-discriminators [choice: HiFi-GAN sums; the mean keeps the paper's
50 : 20 : 1 weights independent of how many sub-discriminators there are]. Feature matching is
L1 per layer, averaged over each sub-discriminator's layers.
"""
from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp
import optax

from data_pipeline.builder import held_out_split
from data_pipeline.input import make_train_iterator
from melody_jax.models import discriminators
from melody_jax.training import accumulate
from melody_jax.training.optim import make_optimizer
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch, Metrics, Task

Outputs = list[tuple[jax.Array, list[jax.Array]]]
EVAL_SEED_OFFSET = 1_000_003


def _halves(outs: Outputs) -> tuple[Outputs, Outputs]:
    """Discriminator outputs of `concat([real, fake])` split into (real, fake) outputs."""
    split = lambda x: jnp.split(x, 2, axis=0)  # noqa: E731
    real, fake = [], []
    for logits, feats in outs:
        (lr, lf), pairs = split(logits), [split(f) for f in feats]
        real.append((lr, [p[0] for p in pairs]))
        fake.append((lf, [p[1] for p in pairs]))
    return real, fake


def discriminator_loss(real: Outputs, fake: Outputs) -> tuple[jax.Array, Metrics]:
    """LSGAN: mean over sub-discriminators of E(D(x) − 1)² + E D(G(z))²."""
    r = jnp.stack([jnp.mean((lr - 1.0) ** 2) for lr, _ in real])
    f = jnp.stack([jnp.mean(lf**2) for lf, _ in fake])
    return jnp.mean(r + f), {"d_real": jnp.mean(r), "d_fake": jnp.mean(f)}


def generator_adversarial(real: Outputs, fake: Outputs) -> tuple[jax.Array, jax.Array]:
    """(LSGAN E(D(G(z)) − 1)², feature-matching L1), each a mean over sub-discriminators."""
    adv = jnp.mean(jnp.stack([jnp.mean((lf - 1.0) ** 2) for lf, _ in fake]))
    fm = jnp.mean(jnp.stack([
        jnp.mean(jnp.stack([jnp.mean(jnp.abs(jax.lax.stop_gradient(a) - b)) for a, b in zip(fr, ff)]))
        for (_, fr), (_, ff) in zip(real, fake)]))
    return adv, fm


class GANTask(Task):
    """A stage whose generator is trained against `config.discriminator` with `config.loss`
    weights `adversarial` and `feature_matching`. Subclasses give the generator's init and its
    reconstruction (with any non-adversarial losses already weighted)."""

    generator_state_collections: tuple[str, ...] = ()  # mutable non-gradient variables, e.g. ("vq_stats",)

    @abc.abstractmethod
    def init_generator(self, rng: jax.Array) -> dict[str, Any]:
        """Boxed variables of the generator: `{"params": ..., <collection>: ...}`."""

    @abc.abstractmethod
    def reconstruct(self, params: Any, state: Any, batch: Batch, rng: jax.Array, train: bool
                    ) -> tuple[jax.Array, jax.Array, jax.Array, Metrics, Any]:
        """(fake `[B, T]`, real `[B, T]`, weighted reconstruction loss, metrics, new generator state)."""

    @property
    def discriminator(self) -> discriminators.Discriminators:
        return discriminators.build(self.config.discriminator)

    def crop_samples(self) -> int:
        return int(round(self.config.data.crop_seconds * self.config.data.sample_rate))

    def init_params(self, rng: jax.Array) -> dict[str, Any]:
        g_key, d_key = jax.random.split(rng)
        variables = dict(self.init_generator(g_key))
        params = {"generator": variables.pop("params"),
                  "discriminator": self.discriminator.init(d_key, jnp.zeros((1, self.crop_samples())))["params"]}
        if self.generator_state_collections:
            params["generator_state"] = {c: variables[c] for c in self.generator_state_collections}
        return params

    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config.optim, self.config.train.num_steps)

    def init_state(self, rng: jax.Array) -> TrainState:
        params = self.init_params(rng)
        opt = self.optimizer()
        return TrainState.create(params, {k: opt.init(params[k]) for k in ("generator", "discriminator")})

    def _weighted_adversarial(self, outs: Outputs) -> tuple[jax.Array, Metrics]:
        w = self.config.loss
        adv, fm = generator_adversarial(*_halves(outs))
        return w.adversarial * adv + w.feature_matching * fm, {"g_adv": adv, "g_fm": fm}

    def _gradients(self, p: Any, gen_state: Any, batch: Batch, rng: jax.Array):
        """(generator grads, discriminator grads, metrics, new generator state) of one (micro-)batch."""
        def generate(g_params):
            fake, real, rec, metrics, new_gen_state = self.reconstruct(g_params, gen_state, batch, rng, True)
            return (fake, rec), (real, metrics, new_gen_state)

        (fake, rec), pullback, (real, metrics, new_gen_state) = jax.vjp(generate, p["generator"], has_aux=True)
        real, fake_sg = jax.lax.stop_gradient(real), jax.lax.stop_gradient(fake)
        d_apply = lambda d, audio: self.discriminator.apply({"params": d}, audio)  # noqa: E731
        outs, d_pullback = jax.vjp(d_apply, p["discriminator"], jnp.concatenate([real, fake_sg], axis=0))

        d_objective = lambda o: discriminator_loss(*_halves(o))  # noqa: E731
        (d_loss, d_metrics), d_cotangent = jax.value_and_grad(d_objective, has_aux=True)(outs)
        d_grads = d_pullback(d_cotangent)[0]
        (adv, adv_metrics), g_cotangent = jax.value_and_grad(self._weighted_adversarial, has_aux=True)(outs)
        fake_grad = jnp.split(d_pullback(g_cotangent)[1], 2, axis=0)[1]
        (g_grads,) = pullback((fake_grad, jnp.ones_like(rec)))
        metrics = {**metrics, **d_metrics, **adv_metrics, "loss": rec + adv, "g_rec": rec, "d_loss": d_loss}
        return g_grads, d_grads, metrics, new_gen_state

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, Metrics]:
        """Both networks step from the same discriminator forward; with `train.grad_accum_steps` = k,
        both gradients are means over k micro-batches (a generator state, e.g. EMA codebooks, is
        updated micro-batch after micro-batch)."""
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
        if new_gen_state is not None:
            params["generator_state"] = new_gen_state
        g_norm, d_norm = optax.tree.norm(g_grads), optax.tree.norm(d_grads)
        metrics = {**metrics, "g_grad_norm": g_norm, "d_grad_norm": d_norm, "grad_norm": jnp.sqrt(g_norm**2 + d_norm**2)}
        return state.replace(params=params, opt_state={"generator": g_opt, "discriminator": d_opt}), metrics

    def loss(self, params: Any, batch: Batch, rng: jax.Array, train: bool = True) -> tuple[jax.Array, Metrics]:
        """The generator's total loss against the current discriminator (what its step minimises)."""
        fake, real, rec, metrics, _ = self.reconstruct(params["generator"], params.get("generator_state"), batch,
                                                       rng, train)
        outs = self.discriminator.apply({"params": params["discriminator"]}, jnp.concatenate([real, fake], axis=0))
        adv, adv_metrics = self._weighted_adversarial(outs)
        return rec + adv, {**metrics, **adv_metrics}

    def describe(self, params: Any) -> dict[str, int]:
        """Parameter count per network and, one level down, per generator part."""
        count = lambda t: sum(x.size for x in jax.tree.leaves(t))  # noqa: E731
        out = {f"generator/{k}": count(v) for k, v in params["generator"].items()}
        return {**out, "discriminator": count(params["discriminator"])}

    # --- data: crops of a prepared dataset at `data.sample_rate`, held out from `data.eval_split` ----
    def _iterator(self, mesh, split: str, seed: int):
        c = self.config
        return make_train_iterator(c.data, global_batch_size=c.train.batch_size, mesh=mesh, seed=seed, split=split,
                                   with_text=False)

    def train_iterator(self, mesh):
        return self._iterator(mesh, "train", self.config.seed)

    def eval_iterator(self, mesh):
        split = held_out_split(self.config.data.path, self.config.data.eval_split)
        return None if split is None else self._iterator(mesh, split, self.config.seed + EVAL_SEED_OFFSET)
