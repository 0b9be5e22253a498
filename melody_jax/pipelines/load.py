"""One entry point from a bundle directory to its `Generator`, whichever system the bundle holds."""
from __future__ import annotations

import jax

from melody_jax.pipelines.bundle import bundle_kind
from melody_jax.pipelines.generation import Generator
from melody_jax.pipelines.melody import MeLoDy
from melody_jax.pipelines.musicgen import MusicGen
from melody_jax.training.sharding import DEFAULT_RULES


def load_pipeline(bundle: str, mesh: jax.sharding.Mesh | None = None, rules=DEFAULT_RULES,
                  progress: bool = True) -> Generator:
    """MeLoDy or MusicGen, by the stages the bundle's manifest lists; `progress` shows MeLoDy's stage bar."""
    if bundle_kind(bundle) == "musicgen":
        return MusicGen(bundle, mesh, rules)
    return MeLoDy(bundle, mesh, rules, progress=progress)
