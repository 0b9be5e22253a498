"""Dual-path diffusion sampling (DESIGN §4.5, §4.6): semantic tokens → VAE latents, with CFG.

Three jit-compiled samplers over the `diffusion.samplers` loops — from noise, continuation
(Algorithm 2) and inpainting — each guiding one batch of conditional and unconditional rows
(`diffusion.guidance`); a new CFG scale does not recompile. `SAMPLE_DEFAULTS` is MeLoDy's sampling
(the DPD's and the semantic LM's): the DPD stage config's `sample` block starts from it, and
`sample_defaults` fills a stored config's block from it for bundles that predate a field.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
from flax import linen as nn

from melody_jax.diffusion.angles import Schedule
from melody_jax.diffusion.guidance import classifier_free_guidance
from melody_jax.diffusion.samplers import continue_latents, generate, inpaint
from melody_jax.models.dpd import guidance_conditions, velocity_fn

# steps: DPD steps per window (the paper runs 5…20; 10 keeps sampling fast at a small cost in FAD);
# cfg: the paper's scale; schedule: the paper's angle schedule ("uniform": its ablation);
# temperature, top_k (0 = off), top_p (1 = off): the semantic LM's; duration: seconds when none is given.
SAMPLE_DEFAULTS: dict[str, Any] = dict(steps=10, cfg=2.5, schedule="paper", temperature=1.0, top_k=0, top_p=1.0,
                                       duration=10.0)


def sample_defaults(dpd_config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The DPD stage config's `sample` block, each field it lacks (older bundles) at its default."""
    stored = dpd_config.get("sample", {})
    return {name: stored.get(name, value) for name, value in SAMPLE_DEFAULTS.items()}


@functools.partial(jax.jit, static_argnames=("model", "length", "num_steps", "schedule"))
def sample_latents(
    model: nn.Module, params: Any, tokens: jax.Array, key: jax.Array, cfg_scale: float | jax.Array, *,
    length: int, num_steps: int, schedule: Schedule,
) -> jax.Array:
    """Text-to-music's diffusion half: latents [B, length, latent] in [-1, 1] from semantic tokens."""
    vfn = classifier_free_guidance(velocity_fn(model, {"params": params}), cfg_scale)
    shape = (tokens.shape[0], length, model.latent_dim)
    return generate(vfn, key, guidance_conditions(tokens), shape, num_steps=num_steps, schedule=schedule)


@functools.partial(jax.jit, static_argnames=("model", "window_length", "chunk_length", "num_steps", "schedule"))
def continue_sampled_latents(
    model: nn.Module, params: Any, z: jax.Array, window_tokens: jax.Array, key: jax.Array,
    cfg_scale: float | jax.Array, *, window_length: int, chunk_length: int, num_steps: int, schedule: Schedule,
) -> jax.Array:
    """Continuation (Algorithm 2): z [B, L0, latent] extended by N chunks; window_tokens [N, B, T_ST]
    are the semantic tokens of each new window. The first L0 frames come back unchanged."""
    vfn = classifier_free_guidance(velocity_fn(model, {"params": params}), cfg_scale)
    conds = jax.vmap(guidance_conditions)(window_tokens)
    return continue_latents(vfn, key, z, conds, window_length=window_length, chunk_length=chunk_length,
                            num_steps=num_steps, schedule=schedule)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "schedule"))
def inpaint_sampled_latents(
    model: nn.Module, params: Any, z: jax.Array, mask: jax.Array, tokens: jax.Array, key: jax.Array,
    cfg_scale: float | jax.Array, *, num_steps: int, schedule: Schedule,
) -> jax.Array:
    """Fills the frames of z [B, L, latent] where mask [B, L] is true; the others come back unchanged."""
    vfn = classifier_free_guidance(velocity_fn(model, {"params": params}), cfg_scale)
    return inpaint(vfn, key, z, mask, guidance_conditions(tokens), num_steps=num_steps, schedule=schedule)
