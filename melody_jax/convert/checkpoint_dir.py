"""Read a Hugging Face checkpoint directory (config.json + safetensors) into float32 numpy arrays.

The safetensors format is parsed here (8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then one buffer) rather than through the `safetensors`
package: its numpy loader has no bfloat16 (numpy lacks the dtype), bf16 is what several public
checkpoints ship, and the format is small enough that a dependency buys nothing. bfloat16 comes from
ml_dtypes (which JAX already depends on). The file is memory-mapped, so float32 tensors are not
copied until the converter uses them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import ml_dtypes
import numpy as np

from melody_jax.training.errors import UserError

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16)}
_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


class ConversionError(UserError, ValueError):
    """A checkpoint cannot be converted; the message is one line naming what is wrong."""


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint directory's config (config.json) and every tensor, as float32."""

    path: str
    config: dict
    tensors: dict[str, np.ndarray]


def read_checkpoint(path: str) -> Checkpoint:
    """Reads config.json and model.safetensors (or the shards a model.safetensors.index.json names)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path} is not a directory (expected a Hugging Face checkpoint directory)")
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"{path} has no config.json (not a Hugging Face checkpoint directory)")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{config_path} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path} does not hold a JSON object")
    return Checkpoint(path=path, config=config, tensors=_read_weights(path))


def _read_weights(path: str) -> dict[str, np.ndarray]:
    if os.path.isfile(os.path.join(path, _SINGLE)):
        return _read_safetensors(os.path.join(path, _SINGLE))
    index_path = os.path.join(path, _INDEX)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConversionError(f"{index_path} is not a safetensors index ({e})") from None
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise ConversionError(f"shard {shard} named in {_INDEX} is missing from {path}")
            tensors.update(_read_safetensors(shard_path))
        return tensors
    if any(os.path.isfile(os.path.join(path, n)) for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise ConversionError(
            f"{path} holds pytorch_model.bin, which is not supported (it needs torch): "
            "save the model with safetensors (save_pretrained(..., safe_serialization=True))")
    raise ConversionError(f"{path} has no weights ({_SINGLE} or {_INDEX})")


def _read_safetensors(file: str) -> dict[str, np.ndarray]:
    """One safetensors file → name → float32 array (views of a memory map where already float32)."""
    data = np.memmap(file, dtype=np.uint8, mode="r")
    name = os.path.basename(file)
    try:
        n = int(np.frombuffer(data[:8], "<u8")[0])
        header = json.loads(bytes(data[8:8 + n]))
    except (ValueError, IndexError) as e:
        raise ConversionError(f"{name} is not a safetensors file ({e})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{name} is not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    buffer = data[8 + n:]
    tensors = {}
    for key, info in header.items():
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{name}: tensor '{key}' has a malformed header entry") from None
        if dtype_name not in _DTYPES:
            raise ConversionError(f"{name}: tensor '{key}' has dtype {dtype_name}; supported: F32, F16, BF16")
        dtype = _DTYPES[dtype_name]
        if not 0 <= start <= end <= buffer.size or end - start != int(np.prod(shape)) * dtype.itemsize:
            raise ConversionError(f"{name}: tensor '{key}' has byte range {start}..{end} that does not fit "
                                  f"its shape {shape} and dtype {dtype_name} (file truncated?)")
        array = buffer[start:end].view(dtype).reshape(shape)
        tensors[key] = array.astype(np.float32, copy=False)
    return tensors


def take(tensors: dict, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """tensors[name] checked against the shape the converter expects."""
    if name not in tensors:
        raise ConversionError(f"missing tensor '{name}'")
    value = tensors[name]
    if tuple(value.shape) != tuple(shape):
        raise ConversionError(f"tensor '{name}' has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def linear(tensors: dict, name: str, d_in: int, out: tuple[int, ...]) -> np.ndarray:
    """torch Linear weight `[prod(out), d_in]` → kernel `[d_in, *out]`."""
    return take(tensors, name, (math.prod(out), d_in)).T.reshape((d_in,) + out)


def linear_in(tensors: dict, name: str, inp: tuple[int, ...], d_out: int) -> np.ndarray:
    """torch Linear weight `[d_out, prod(inp)]` → kernel `[*inp, d_out]` (an attention output)."""
    return take(tensors, name, (d_out, math.prod(inp))).T.reshape(inp + (d_out,))


def weight_norm(tensors: dict, module: str, shape: tuple[int, ...], dim: int = 0) -> np.ndarray:
    """The weight-normed `module.weight` of torch shape `shape`, folded: w = g · v / ‖v‖, the norm over
    every axis but `dim` (torch's `weight_norm(dim=...)`). Both namings are read: the parametrization's
    `parametrizations.weight.original0/1` and the older `weight_g / weight_v`."""
    names = [(f"{module}.parametrizations.weight.original0", f"{module}.parametrizations.weight.original1"),
             (f"{module}.weight_g", f"{module}.weight_v")]
    g_name, v_name = next((n for n in names if n[1] in tensors), names[0])
    g = take(tensors, g_name, tuple(n if i == dim else 1 for i, n in enumerate(shape)))
    v = take(tensors, v_name, shape)
    axes = tuple(i for i in range(len(shape)) if i != dim)
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=axes, keepdims=True))
    return (g * v / np.maximum(norm, 1e-30)).astype(np.float32)


def check_fits(params: dict, shapes, what: str) -> None:
    """Every parameter the model expects is there with its shape, and nothing else."""
    got = {jax.tree_util.keystr(p): np.shape(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    want = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(shapes)}
    for name, shape in want.items():
        if name not in got:
            raise ConversionError(f"{what}: the converted parameters lack {name}")
        if got[name] != shape:
            raise ConversionError(f"{what}: {name} has shape {got[name]}, the model expects {shape}")
    extra = sorted(set(got) - set(want))
    if extra:
        raise ConversionError(f"{what}: unexpected converted parameters {extra[:3]}")
