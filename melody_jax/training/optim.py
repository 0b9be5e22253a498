"""Optimizers and learning-rate schedules from `config.optim`.

`dadapt_adamw` (D-Adaptation Adam, audiocraft's `dadam` for MusicGen) and `prodigy` estimate the step
size themselves: `optim.lr` is then a multiplier of that estimate (1.0 in their recipes), still shaped
by the schedule; `optim.estim_lr0` is their initial estimate.
"""
from __future__ import annotations

import ml_collections
import optax
from optax import contrib

STEP_SIZE_FREE = ("dadapt_adamw", "prodigy")  # optimizers that estimate their own step size


def schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    warmup = int(optim.warmup_steps)
    if optim.schedule == "constant":
        main = optax.constant_schedule(optim.lr)
    elif optim.schedule == "cosine":
        main = optax.cosine_decay_schedule(optim.lr, max(num_steps - warmup, 1))
    else:  # exponential: HiFi-GAN's per-epoch decay, expressed per `decay_steps` steps
        main = optax.exponential_decay(optim.lr, optim.decay_steps, optim.decay_rate)
    if warmup == 0:
        return main
    # D-Adaptation and Prodigy divide by the step's lr-weighted gradient sum: a warmup from exactly 0
    # makes their first step 0/0, so theirs starts one warmup increment up
    start = optim.lr / (warmup + 1) if optim.name in STEP_SIZE_FREE else 0.0
    return optax.join_schedules([optax.linear_schedule(start, optim.lr, warmup), main], [warmup])


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    lr = schedule(optim, num_steps)
    if optim.name == "sgd":
        core = optax.sgd(lr, momentum=optim.b1)
    elif optim.name == "adam":
        core = optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    elif optim.name == "dadapt_adamw":
        core = contrib.dadapt_adamw(lr, betas=(optim.b1, optim.b2), eps=optim.eps,
                                    estim_lr0=optim.get("estim_lr0", 1e-6), weight_decay=optim.weight_decay)
    elif optim.name == "prodigy":
        core = contrib.prodigy(lr, betas=(optim.b1, optim.b2), eps=optim.eps, estim_lr0=optim.get("estim_lr0", 1e-6),
                               weight_decay=optim.weight_decay)
    else:
        core = optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)
    if optim.grad_clip_norm:
        return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), core)
    return core
