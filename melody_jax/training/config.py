"""Config validation and JSON round-trips: a bad value becomes one line naming the field."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections

from melody_jax.training.errors import ConfigError
from melody_jax.training.metrics import json_safe
from melody_jax.training.sharding import config_rules


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = get_field(config, field)
        require(_finite(value) and value > 0, f"config.{field}={value!r} must be > 0")


def non_negative(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = get_field(config, field)
        require(_finite(value) and value >= 0, f"config.{field}={value!r} must be >= 0")


def one_of(config: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]) -> None:
    value = get_field(config, field)
    require(value in choices, f"config.{field}={value!r} must be one of {choices}")


def _finite(value: Any) -> bool:
    """A real number (not a bool, NaN or ±inf): `lr=inf` must fail validation, not training."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
            name = dotted if dotted.isprintable() and len(dotted) <= 120 else _short(dotted)
            raise ConfigError(f"config.{name} is missing")
        node = node[part]
    return node


def validate_common(config: ml_collections.ConfigDict) -> None:
    """The shared contract of DESIGN §3: fields every stage has."""
    for field in ("seed", "stage", "mesh", "train.num_steps"):
        get_field(config, field)
    require(isinstance(config.seed, int) and not isinstance(config.seed, bool),
            f"config.seed={config.seed!r} must be an integer")
    positive(config, "train.num_steps", "train.log_every", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps")
    non_negative(config, "train.stop_at_step")
    if "attention_impl" in config.model:
        check_attention(config)
    for axis, size in config.mesh.items():
        require(isinstance(size, int) and (size > 0 or size == -1),
                f"config.mesh.{axis}={size!r} must be a positive int or -1")
    try:
        config_rules(config)
    except (ValueError, TypeError) as e:
        message = " ".join(str(e).split())
        raise ConfigError(message if message.startswith("config.") else
                          f"config.sharding_rules={' '.join(repr(config.get('sharding_rules')).split())[:120]}: "
                          f"each rule must be [logical name, mesh axis or list or null] ({message})") from None


def validate_optimization(config: ml_collections.ConfigDict) -> None:
    """The contract of a stage trained by gradients (not of a fitted one): batch size, optimizer, EMA."""
    for field in ("train.batch_size", "optim.lr"):
        get_field(config, field)
    positive(config, "train.batch_size", "optim.lr")
    non_negative(config, "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip_norm")
    one_of(config, "optim.schedule", ("cosine", "constant", "exponential"))
    one_of(config, "optim.name", ("adamw", "adam", "sgd", "dadapt_adamw", "prodigy"))
    train = config.train
    require(_finite(train.get("ema_decay", 0.0)) and 0 <= train.get("ema_decay", 0.0) < 1,
            f"config.train.ema_decay={train.get('ema_decay')!r} must lie in [0, 1) (0 = off)")
    accum = train.get("grad_accum_steps", 1)
    require(isinstance(accum, int) and not isinstance(accum, bool) and accum >= 1,
            f"config.train.grad_accum_steps={accum!r} must be an integer >= 1")
    require(train.batch_size % accum == 0,
            f"config.train.grad_accum_steps={accum} does not divide train.batch_size={train.batch_size}")
    require(_finite(config.optim.b1) and _finite(config.optim.b2) and 0 <= config.optim.b1 < 1
            and 0 <= config.optim.b2 < 1,
            f"config.optim.b1={config.optim.b1}, b2={config.optim.b2} must lie in [0, 1)")


def check_attention(config: ml_collections.ConfigDict) -> None:
    """`model.attention_impl`: the cuDNN kernel exists on GPUs only, for 16-bit inputs."""
    one_of(config, "model.attention_impl", ("xla", "cudnn"))
    if config.model.attention_impl == "cudnn":
        backend = jax.default_backend()
        require(backend == "gpu", f"config.model.attention_impl='cudnn' needs a GPU with cuDNN; this backend is "
                                  f"{backend} (use 'xla')")
        require(config.model.get("dtype") in ("bfloat16", "float16"),
                f"config.model.attention_impl='cudnn' needs model.dtype bfloat16 or float16, not "
                f"{config.model.get('dtype')!r}")


def _short(text: str, limit: int = 120) -> str:
    """One line, bounded: error messages quote user text, which may be huge or hold newlines."""
    quoted = repr(text) if len(text) <= limit else repr(text[:limit]) + "..."
    return " ".join(quoted.split())


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(json_safe(config.to_dict()), indent=2, sort_keys=True, default=str, allow_nan=False)


def from_json(text: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(json.loads(text))


def parse_value(text: str) -> Any:
    """'3e-4' → 3e-4, '4' → 4, 'true' → True, '[1,2]' → [1, 2], anything else stays a string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or too deep / too many digits to be a config value
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Returns a copy with `a.b=value` overrides applied, keeping each field's type discipline."""
    config = ml_collections.ConfigDict(config.to_dict())
    for dotted, text in overrides.items():
        value = parse_value(text)
        current = get_field(config, dotted)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise ConfigError(f"config.{dotted}={_short(text)} is too large for a float") from None
        if isinstance(current, str) and value is not None and not isinstance(value, str):
            value = text  # a text field takes the text as written: a path named `2024` stays a path
        if isinstance(value, bool) and isinstance(current, (int, float)) and not isinstance(current, bool):
            raise ConfigError(f"config.{dotted}={_short(text)} must be of type {type(current).__name__}, not bool")
        parent, _, leaf = dotted.rpartition(".")
        node = get_field(config, parent) if parent else config
        try:
            node[leaf] = value
        except (TypeError, ValueError, AttributeError, KeyError):  # ConfigDict's own type discipline
            raise ConfigError(f"config.{dotted}={_short(text)} must be of type {type(current).__name__}, "
                              f"not {type(value).__name__}") from None
    return config


