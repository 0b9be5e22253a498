"""Shared validators for the checks a stage makes of its upstream stages (and a bundle of its stages)."""
from __future__ import annotations

from melody_jax.training.errors import ConfigError


def need(ok: bool, message: str, error: type[Exception] = ConfigError) -> None:
    """Raises `error(message)` unless `ok`: the one-line form of every fit check."""
    if not ok:
        raise error(message)


def require_upstream(config, *stages: str) -> None:
    """Every `config.upstream.<stage>` named is set: the directories of the stages this one reads."""
    for stage in stages:
        need(bool(config.get("upstream", {}).get(stage)), f"config.upstream.{stage} is empty; name the {stage} "
             f"stage's workdir (or a bundle's {stage} folder)")
