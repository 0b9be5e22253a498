"""Dual-path diffusion sampling (DESIGN §4.5, §4.6): semantic tokens → VAE latents, with CFG.

Jit-compiled samplers over the `diffusion.samplers` loops — from noise, continuation (Algorithm 2),
inpainting, and inpainting window by window (`inpaint_plan`) — each guiding one batch of conditional
and unconditional rows
(`diffusion.guidance`); a new CFG scale does not recompile. `SAMPLE_DEFAULTS` is MeLoDy's sampling
(the DPD's and the semantic LM's): the DPD stage config's `sample` block starts from it, and
`sample_defaults` fills a stored config's block from it for bundles that predate a field.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn

from melody_jax.diffusion.angles import Schedule
from melody_jax.diffusion.guidance import classifier_free_guidance
from melody_jax.diffusion.samplers import continue_latents, generate, inpaint, split_keys
from melody_jax.models.dpd import guidance_conditions, velocity_fn

# steps: DPD steps per window (the paper runs 5…20; 10 keeps sampling fast at a small cost in FAD);
# cfg: the paper's scale; schedule: the paper's angle schedule ("uniform": its ablation);
# temperature, top_k (0 = off), top_p (1 = off): the semantic LM's; lm_cfg: the LM's guidance scale against the
# null prefix (1 = off; other scales need an LM trained with model.cfg_dropout); duration: seconds when none is given;
# inpaint_candidates: spans the LM draws per inpainting, one kept by how well the right context follows
# it (melody.py `MeLoDy.inpaint`; 1 = the left context only) [choice: the paper does not say].
SAMPLE_DEFAULTS: dict[str, Any] = dict(steps=10, cfg=2.5, schedule="paper", temperature=1.0, top_k=0, top_p=1.0,
                                       lm_cfg=1.0, duration=10.0, inpaint_candidates=4)


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
    return generate(vfn, key, guidance_conditions(tokens), shape, num_steps=num_steps, schedule=schedule,
                    scale=model.input_scale)


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
                            num_steps=num_steps, schedule=schedule, scale=model.input_scale)


@functools.partial(jax.jit, static_argnames=("model", "num_steps", "schedule"))
def inpaint_sampled_latents(
    model: nn.Module, params: Any, z: jax.Array, mask: jax.Array, tokens: jax.Array, key: jax.Array,
    cfg_scale: float | jax.Array, *, num_steps: int, schedule: Schedule,
) -> jax.Array:
    """Fills the frames of z [B, L, latent] where mask [B, L] is true; the others come back unchanged."""
    vfn = classifier_free_guidance(velocity_fn(model, {"params": params}), cfg_scale)
    return inpaint(vfn, key, z, mask, guidance_conditions(tokens), num_steps=num_steps, schedule=schedule,
                   scale=model.input_scale)


def inpaint_plan(num_tokens: int, start: int, end: int, window: int, chunk: int) -> np.ndarray:
    """int32 [N, 3]: the DPD windows that inpaint tokens [start, end) of a clip of `num_tokens`, as
    (window start, first new token, end of the new tokens); each window is `window` tokens (the
    whole clip when it is shorter) and fills only span tokens no earlier window filled.

    Like continuation (Algorithm 2), a window that cannot reach the span's end keeps `window − chunk`
    tokens before its new ones; the window that can is centred on what is left of the span, so it sees
    the context on both sides. A span inside one window is one window, the clip's own when it fits.
    """
    if not 0 <= start < end <= num_tokens or not 0 < chunk <= window:
        raise ValueError(f"need 0 <= start ({start}) < end ({end}) <= {num_tokens} and 0 < chunk ({chunk}) <= "
                         f"window ({window})")
    window = min(window, num_tokens)
    plan, new = [], start
    while new < end:
        rest = end - new
        first = new - (window - rest) // 2 if rest <= window else new - (window - chunk)
        first = min(max(first, 0), num_tokens - window)
        plan.append((first, new, min(end, first + window)))
        new = plan[-1][2]
    return np.asarray(plan, np.int32)


@functools.partial(jax.jit, static_argnames=("model", "window_tokens", "frames_per_token", "num_steps", "schedule"))
def inpaint_windows(
    model: nn.Module, params: Any, z: jax.Array, tokens: jax.Array, plan: jax.Array, key: jax.Array,
    cfg_scale: float | jax.Array, *, window_tokens: int, frames_per_token: int, num_steps: int, schedule: Schedule,
) -> jax.Array:
    """Inpaints z [B, L, latent] window by window along `plan` (`inpaint_plan`, windows of
    `window_tokens` tokens) in one `lax.scan`; window i draws from split_keys(key, N)[i]. Frames
    outside the plan's new ranges come back unchanged."""
    vfn = classifier_free_guidance(velocity_fn(model, {"params": params}), cfg_scale)
    fpt, length = frames_per_token, window_tokens * frames_per_token

    def step(z, inputs):
        first, new, end, step_key = inputs
        window = jax.lax.dynamic_slice_in_dim(z, first * fpt, length, axis=1)
        frame = first * fpt + jnp.arange(length)
        mask = (frame >= new * fpt) & (frame < end * fpt)
        cond = guidance_conditions(jax.lax.dynamic_slice_in_dim(tokens, first, window_tokens, axis=1))
        out = inpaint(vfn, step_key, window, mask, cond, num_steps=num_steps, schedule=schedule,
                      scale=model.input_scale)
        return jax.lax.dynamic_update_slice_in_dim(z, out, first * fpt, axis=1), None

    z, _ = jax.lax.scan(step, z, (plan[:, 0], plan[:, 1], plan[:, 2], split_keys(key, plan.shape[0])))
    return z
