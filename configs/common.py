"""Fields every stage shares (DESIGN §3 'shared contracts'); stage configs start from `base_config`."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import ml_collections

PRESETS = ("tiny", "small", "base", "paper")


def base_config(stage: str) -> ml_collections.ConfigDict:
    """A stage trained by gradients: the shared fields, a batch size, an optimizer, EMA and LoRA."""
    c = fitting_config(stage)
    c.train.batch_size = 32  # global
    c.train.ema_decay = 0.0  # >0: keep an EMA of the parameters; evaluation and bundles use it
    c.train.grad_accum_steps = 1  # micro-batches per step (lax.scan); memory follows batch_size / this

    c.optim = ml_collections.ConfigDict()
    c.optim.name = "adamw"
    c.optim.lr = 3e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.schedule = "cosine"  # cosine | constant | exponential
    c.optim.warmup_steps = 0
    c.optim.decay_rate = 0.999  # exponential: factor per `decay_steps`
    c.optim.decay_steps = 1000
    c.optim.grad_clip_norm = 1.0  # 0 disables
    c.optim.estim_lr0 = 1e-6  # dadapt_adamw / prodigy: initial step-size estimate (lr is then a multiplier)

    # LoRA fine-tuning (training/lora.py): rank 0 = off; kernels whose path matches a pattern get adapters
    c.model.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 8.0, "patterns": ["*/query/kernel", "*/value/kernel"]})
    return c


def fitting_config(stage: str) -> ml_collections.ConfigDict:
    """A stage fitted by its own steps (k-means iterations, RVQ levels) over all its data each step: the
    fields every stage shares, without batch size or optimizer (melody_jax/training/task.py FittingTask)."""
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.mesh_devices = 0  # 0: the mesh spans every device; N: only the first N (one process; small runs, tests)
    # Data parallel, FSDP and tensor parallel differ only in mesh shape and these rules (DESIGN §8).
    c.sharding = ml_collections.ConfigDict()
    c.sharding.strategy = "fsdp_tp"  # dp | fsdp | tp | fsdp_tp (see training/sharding.py STRATEGIES)
    c.sharding.min_sharded_size = 1 << 20  # fsdp: arrays this large must be split over fsdp, or init fails
    c.sharding_rules = []  # [[logical name, mesh axis or list or None], ...] overriding the strategy's

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000  # also the horizon of the learning-rate schedule
    c.train.stop_at_step = 0  # >0: checkpoint and exit there (time-sliced jobs); resume later
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.eval_batches = 4
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3
    c.train.max_bad_steps = 10  # consecutive non-finite steps before the run stops
    c.train.tensorboard = True
    c.train.progress_bar = True
    c.train.init_from = ""  # a workdir or bundle of this stage: start from its parameters (by name and shape)

    # Every stage's data, one way (melody_jax/tasks/sources.py): the source, what it reads, its
    # held-out split ("" = no evaluation). Each stage config sets them.
    c.data = ml_collections.ConfigDict({"source": "", "path": "", "eval_split": ""})
    c.model = ml_collections.ConfigDict()
    return c


def set_fields(config: ml_collections.ConfigDict, fields: Mapping[str, Any]) -> None:
    """Sets (creating them) the dotted fields of a preset table: each preset names what it sets."""
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value


def check_preset(arg: str | None) -> str:
    preset = arg or "tiny"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    return preset


def stage_config(stage: str, preset: str = "tiny", overrides: Mapping[str, Any] | None = None
                 ) -> ml_collections.ConfigDict:
    """configs/<stage>.py at `preset` with dotted `a.b` overrides, the syntax of `--config.a.b=value`."""
    from melody_jax.training.config import apply_overrides

    config = importlib.import_module(f"configs.{stage}").get_config(preset)
    return apply_overrides(config, {k: str(v) for k, v in (overrides or {}).items()})
