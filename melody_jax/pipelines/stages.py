"""Sizes shared by the sampling pipelines (the frozen stages themselves live in `melody_jax.frozen`)."""
from __future__ import annotations

import math


def frames(seconds: float, rate: float) -> int:
    return int(math.ceil(seconds * rate - 1e-9))
