"""KV-cache sampling for decoder LMs (DESIGN §4.4, §4.6): one jit per shape, no Python loop per token.

Works for any Linen LM whose `decode=True` clone keeps its KV cache in the `cache` collection and
whose sampled outputs are its next inputs (`DecoderLM`, `SemanticLM`). Given an unconditional `null_prefix`, each
token is drawn from the guided logits u + s·(c − u) of both prefixes run as one batch. The cache is preallocated
for prefix + new tokens, the prefix is prefilled in one call, and the tokens come from a
`jax.lax.scan`. Row b draws from keys folded from (key, b, step) — or from its own key — so a row's
tokens do not depend on the other rows of the batch. Call inside `melody_jax.training.sharding.activate(mesh, rules)` to
sample with sharded parameters; the active rules are part of the compilation key.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from melody_jax.diffusion.guidance import guide


def filter_logits(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """logits / temperature, with every token outside the top-k and then the top-p set at -inf.

    top_k = 0 (or ≥ V) and top_p = 1 disable the filters; ties at the k-th logit are all kept; the
    top-p set is the smallest prefix (by probability) whose mass reaches top_p, at least one token.
    """
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        ordered = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        kept = (jnp.cumsum(probs, axis=-1) - probs < top_p) & (probs > 0)  # rounding never revives -inf
        threshold = jnp.min(jnp.where(kept, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_from_logits(key: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0) -> jax.Array:
    """One token per row of logits [..., V]; temperature 0 is greedy (the first maximum).

    Inverse-CDF sampling: one uniform per row, where Gumbel-max would draw V of them (on CPU the
    random bits cost more than the model step at batch 8). A token outside the kept set has weight 0,
    so the cumulative sum does not rise there and the token is never drawn.
    """
    if temperature == 0:
        return _argmax(logits)
    filtered = filter_logits(logits, temperature, top_k, top_p)
    cdf = jnp.cumsum(jnp.exp(filtered - filtered.max(axis=-1, keepdims=True)), axis=-1)
    threshold = jax.random.uniform(key, cdf.shape[:-1] + (1,)) * cdf[..., -1:]  # < cdf[..., -1]
    return jnp.sum(cdf <= threshold, axis=-1).astype(jnp.int32)


def _argmax(logits: jax.Array) -> jax.Array:
    """jnp.argmax as two plain reductions: XLA:CPU runs argmax's (value, index) reduce ~10× slower."""
    size = logits.shape[-1]
    is_max = logits == logits.max(axis=-1, keepdims=True)
    return jnp.min(jnp.where(is_max, jnp.arange(size), size), axis=-1).astype(jnp.int32)


def _compute_dtype_params(params, dtype: jnp.dtype):
    """Matrices cast once to the compute dtype, so each step reads half the bytes in bfloat16.

    Layers cast their kernels to the compute dtype anyway; 1-D scales stay float32 as in training.
    """
    if dtype == jnp.float32:
        return params
    return jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 else p, params)


def _decode(model: nn.Module, params, prefix: jax.Array, num_tokens: int,
            pick: Callable[[jax.Array, jax.Array], jax.Array], keep_logits: bool):
    """Prefill `prefix`, then `num_tokens` steps; pick(logits [B, V], step) → next tokens [B]."""
    dec = model.clone(decode=True)
    batch, length = prefix.shape
    shapes = jax.eval_shape(dec.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((batch, length + num_tokens), jnp.int32))["cache"]
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    params = _compute_dtype_params(params, jnp.dtype(model.dtype))

    def forward(cache, tokens):
        logits, updated = dec.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
        return updated["cache"], logits[:, -1]

    cache, logits = forward(cache, prefix)
    first = pick(logits, jnp.int32(0))

    def step(carry, i):
        cache, token = carry
        cache, logits = forward(cache, token[:, None])
        token = pick(logits, i)
        return (cache, token), (token, logits if keep_logits else None)

    _, (rest, rest_logits) = jax.lax.scan(step, (cache, first), jnp.arange(1, num_tokens, dtype=jnp.int32))
    tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
    if not keep_logits:
        return tokens, None
    return tokens, jnp.concatenate([logits[:, None], jnp.swapaxes(rest_logits, 0, 1)], axis=1)


@functools.partial(jax.jit, static_argnames=("model", "num_tokens", "temperature", "top_k", "top_p", "rules"))
def _sample(model, params, prefix, key, null_prefix, cfg_scale, *, num_tokens, temperature, top_k, top_p, rules):
    del rules  # only part of the compilation key
    batch = prefix.shape[0]
    row_keys = key if key.ndim else jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(batch))
    guided = null_prefix is not None
    if guided:  # the unconditional rows follow the conditional ones in one batch, fed the same tokens
        prefix = jnp.concatenate([prefix, null_prefix])

    def pick(logits, step):
        if guided:
            logits = guide(logits[:batch], logits[batch:], cfg_scale)
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        tokens = jax.vmap(lambda k, row: sample_from_logits(k, row, temperature, top_k, top_p))(keys, logits)
        return jnp.concatenate([tokens, tokens]) if guided else tokens

    return _decode(model, params, prefix, num_tokens, pick, keep_logits=False)[0][:batch]


@functools.partial(jax.jit, static_argnames=("model", "rules"))
def _teacher_forced(model, params, prefix, tokens, *, rules):
    del rules
    return _decode(model, params, prefix, tokens.shape[1], lambda _, step: tokens[:, step], keep_logits=True)[1]


def _active_rules() -> tuple:
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in nn.get_logical_axis_rules())


def _checked_null(model: nn.Module, prefix: jax.Array, null_prefix: jax.Array | None) -> jax.Array | None:
    """The unconditional prefix as int32, refused where it cannot stand beside `prefix` for this model."""
    if null_prefix is None:
        return None
    if np.shape(null_prefix) != prefix.shape:
        raise ValueError(f"null_prefix has shape {np.shape(null_prefix)}, the prefix {prefix.shape}")
    if getattr(model, "null_prefix", True) is False:  # its null codes would alias other codes
        raise ValueError("this LM has no null prefix to guide against (train it with model.cfg_dropout > 0)")
    return jnp.asarray(null_prefix, jnp.int32)


def sample(model: nn.Module, params, prefix: jax.Array, num_tokens: int, key: jax.Array, temperature: float = 1.0,
           top_k: int = 0, top_p: float = 1.0, null_prefix: jax.Array | None = None,
           cfg_scale: float = 1.0) -> jax.Array:
    """int32 [B, num_tokens] drawn after prefix int32 [B, P]; same key ⇒ same tokens.

    `key` is one key (row b draws from fold_in(key, b)) or one key per row, shape [B]: then a row's
    tokens are the same whatever batch it is sampled in. With `null_prefix` [B, P] (the same stream
    without its condition), tokens follow the logits guided by `cfg_scale` (a new scale does not recompile).
    """
    if num_tokens < 1 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need num_tokens >= 1, temperature >= 0, top_k >= 0, 0 < top_p <= 1; got "
                         f"{num_tokens}, {temperature}, {top_k}, {top_p}")
    prefix = jnp.asarray(prefix, jnp.int32)
    return _sample(model, params, prefix, key, _checked_null(model, prefix, null_prefix), jnp.float32(cfg_scale),
                   num_tokens=int(num_tokens), temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   rules=_active_rules())


def continue_tokens(model: nn.Module, params, prefix: jax.Array, context_tokens: jax.Array, num_new: int,
                    key: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    null_prefix: jax.Array | None = None, cfg_scale: float = 1.0) -> jax.Array:
    """int32 [B, num_new] following prefix ⊕ context_tokens (guided against null_prefix ⊕ context_tokens).

    Continuation (DESIGN §4.6): prefix = the 12 MuLan tokens, context = the last T_ST − M_ST semantic
    tokens, num_new = M_ST, so positions stay within the trained length.
    """
    context = jnp.asarray(context_tokens, jnp.int32)
    joined = lambda p: jnp.concatenate([jnp.asarray(p, jnp.int32), context], axis=1)  # noqa: E731
    return sample(model, params, joined(prefix), num_new, key, temperature, top_k, top_p,
                  None if null_prefix is None else joined(null_prefix), cfg_scale)


@functools.partial(jax.jit, static_argnames=("model", "num_windows", "chunk", "temperature", "top_k", "top_p",
                                             "rules"))
def _continue_windows(model, params, prefix, context, keys, first_window, null_prefix, cfg_scale, *, num_windows, chunk,
                      temperature, top_k, top_p, rules):
    def window(ctx, i):
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, i))(keys)
        joined = lambda p: None if p is None else jnp.concatenate([p, ctx], axis=1)  # noqa: E731
        new = _sample(model, params, joined(prefix), step_keys, joined(null_prefix), cfg_scale, num_tokens=chunk,
                      temperature=temperature, top_k=top_k, top_p=top_p, rules=rules)
        return jnp.concatenate([ctx, new], axis=1)[:, chunk:], new

    _, chunks = jax.lax.scan(window, context, first_window + jnp.arange(num_windows))
    return jnp.swapaxes(chunks, 0, 1).reshape(prefix.shape[0], num_windows * chunk)


def continue_windows(model: nn.Module, params, prefix: jax.Array, context_tokens: jax.Array, keys: jax.Array,
                     num_windows: int, chunk: int, first_window: int = 0, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, null_prefix: jax.Array | None = None, cfg_scale: float = 1.0) -> jax.Array:
    """int32 [B, num_windows · chunk]: `continue_tokens` repeated in one `lax.scan`, window by window.

    Window w draws `chunk` tokens after prefix ⊕ the last C tokens (C = context_tokens' length) with
    per-row keys fold_in(keys[b], first_window + w), exactly as the same calls one by one would.
    """
    if num_windows < 1 or chunk < 1:
        raise ValueError(f"need num_windows >= 1 and chunk >= 1, got {num_windows}, {chunk}")
    prefix = jnp.asarray(prefix, jnp.int32)
    return _continue_windows(model, params, prefix, jnp.asarray(context_tokens, jnp.int32), keys,
                             jnp.int32(first_window), _checked_null(model, prefix, null_prefix), jnp.float32(cfg_scale),
                             num_windows=int(num_windows), chunk=int(chunk), temperature=float(temperature),
                             top_k=int(top_k), top_p=float(top_p), rules=_active_rules())


def teacher_forced_logits(model: nn.Module, params, prefix: jax.Array, tokens: jax.Array) -> jax.Array:
    """float32 [B, N, V]: the sampler's cached logits for each of tokens [B, N], fed instead of samples.

    Row n predicts tokens[:, n]; it equals the uncached forward on prefix ⊕ tokens at position P − 1 + n.
    """
    return _teacher_forced(model, params, jnp.asarray(prefix, jnp.int32), jnp.asarray(tokens, jnp.int32),
                           rules=_active_rules())
