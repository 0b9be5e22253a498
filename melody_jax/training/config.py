"""Config validation and JSON round-trips: a bad value becomes one line naming the field."""
from __future__ import annotations

import json
from typing import Any

import ml_collections

from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import rules_from_config


def require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def positive(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = get_field(config, field)
        require(isinstance(value, (int, float)) and value > 0, f"config.{field}={value!r} must be > 0")


def non_negative(config: ml_collections.ConfigDict, *fields: str) -> None:
    for field in fields:
        value = get_field(config, field)
        require(isinstance(value, (int, float)) and value >= 0, f"config.{field}={value!r} must be >= 0")


def one_of(config: ml_collections.ConfigDict, field: str, choices: tuple[str, ...]) -> None:
    value = get_field(config, field)
    require(value in choices, f"config.{field}={value!r} must be one of {choices}")


def get_field(config: ml_collections.ConfigDict, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if part not in node:
            raise ConfigError(f"config.{dotted} is missing")
        node = node[part]
    return node


def validate_common(config: ml_collections.ConfigDict) -> None:
    """The shared contract of DESIGN §3: fields every stage has."""
    for field in ("seed", "stage", "mesh", "train.num_steps", "train.batch_size", "optim.lr"):
        get_field(config, field)
    positive(config, "train.num_steps", "train.batch_size", "train.log_every", "train.eval_every",
             "train.checkpoint_every", "train.keep_checkpoints", "train.max_bad_steps", "optim.lr")
    non_negative(config, "train.stop_at_step", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip_norm")
    one_of(config, "optim.schedule", ("cosine", "constant", "exponential"))
    one_of(config, "optim.name", ("adamw", "adam", "sgd"))
    require(0 <= config.optim.b1 < 1 and 0 <= config.optim.b2 < 1,
            f"config.optim.b1={config.optim.b1}, b2={config.optim.b2} must lie in [0, 1)")
    for axis, size in config.mesh.items():
        require(isinstance(size, int) and (size > 0 or size == -1),
                f"config.mesh.{axis}={size!r} must be a positive int or -1")
    try:
        rules_from_config(config.sharding_rules)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


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
    except json.JSONDecodeError:
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, str]) -> ml_collections.ConfigDict:
    """Returns a copy with `a.b=value` overrides applied, keeping each field's type discipline."""
    config = ml_collections.ConfigDict(config.to_dict())
    for dotted, text in overrides.items():
        value = parse_value(text)
        current = get_field(config, dotted)
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        parent, _, leaf = dotted.rpartition(".")
        node = get_field(config, parent) if parent else config
        try:
            node[leaf] = value
        except TypeError as e:
            raise ConfigError(f"config.{dotted}={text!r}: {e}") from None
    return config


