"""Writes safetensors files with numpy alone, so tests can build checkpoints without torch."""
import json
import os

import ml_dtypes
import numpy as np

_NAMES = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype("int64"): "I64"}


def write_safetensors(file: str, tensors: dict) -> None:
    """The format: 8-byte little-endian header length, a JSON header, then the tensors' bytes."""
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, value in tensors.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[name] = {"dtype": _NAMES[np.dtype(value.dtype)], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + b"".join(chunks))


def write_checkpoint(directory: str, config: dict, tensors: dict, shards: int = 1) -> None:
    """config.json + model.safetensors, or `shards` files and a model.safetensors.index.json."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if shards == 1:
        write_safetensors(os.path.join(directory, "model.safetensors"), tensors)
        return
    names, weight_map = list(tensors), {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        write_safetensors(os.path.join(directory, shard), part)
        weight_map.update({n: shard for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
