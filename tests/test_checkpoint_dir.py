"""Reading Hugging Face checkpoint directories without torch: dtypes, shards, and each refusal."""
import os

import ml_dtypes
import numpy as np
import pytest

from melody_jax.convert.checkpoint_dir import ConversionError, read_checkpoint, take
from tests.safetensors_writer import write_checkpoint, write_safetensors

_CONFIG = {"model_type": "encodec", "sampling_rate": 32000}


def _tensors():
    rng = np.random.default_rng(0)
    return {"a.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "b.bias": rng.normal(size=(5,)).astype(np.float32),
            "c.scale": np.array(rng.normal(), np.float32),
            "d.table": rng.normal(size=(2, 3, 2)).astype(np.float32)}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_reads_each_dtype_as_float32(tmp_path, dtype):
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    stored = {k: v.astype(np_dtype) for k, v in _tensors().items()}
    write_checkpoint(str(tmp_path), _CONFIG, stored)
    ckpt = read_checkpoint(str(tmp_path))
    assert ckpt.config == _CONFIG and ckpt.path == str(tmp_path)
    assert sorted(ckpt.tensors) == sorted(stored)
    for k, v in stored.items():
        assert ckpt.tensors[k].dtype == np.float32
        np.testing.assert_array_equal(ckpt.tensors[k], v.astype(np.float32))
    if dtype != "float32":  # the narrow formats really were narrower: values moved off float32's
        assert not np.array_equal(ckpt.tensors["a.weight"], _tensors()["a.weight"])


def test_reads_sharded_index(tmp_path):
    write_checkpoint(str(tmp_path), _CONFIG, _tensors(), shards=3)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]) == 3
    ckpt = read_checkpoint(str(tmp_path))
    assert sorted(ckpt.tensors) == sorted(_tensors())
    for k, v in _tensors().items():
        np.testing.assert_array_equal(ckpt.tensors[k], v)


def _refusal(tmp_path, setup):
    setup(tmp_path)
    with pytest.raises(ConversionError) as e:
        read_checkpoint(str(tmp_path / "ckpt"))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_refusals_name_the_problem(tmp_path):
    def not_a_directory(p):
        (p / "ckpt").write_text("x")
    assert "is not a directory" in _refusal(tmp_path / "1", lambda p: (p.mkdir(), not_a_directory(p)))

    def no_config(p):
        write_safetensors(str(p / "model.safetensors"), _tensors())
    assert "no config.json" in _refusal(tmp_path / "2", lambda p: (os.makedirs(p / "ckpt"), no_config(p / "ckpt")))

    def no_weights(p):
        write_checkpoint(str(p), _CONFIG, _tensors())
        os.remove(p / "model.safetensors")
    assert "has no weights" in _refusal(tmp_path / "3", lambda p: no_weights(p / "ckpt"))

    def torch_bin(p):
        no_weights(p)
        (p / "pytorch_model.bin").write_bytes(b"\0" * 16)
    assert "pytorch_model.bin, which is not supported" in _refusal(tmp_path / "4", lambda p: torch_bin(p / "ckpt"))

    def missing_shard(p):
        write_checkpoint(str(p), _CONFIG, _tensors(), shards=2)
        os.remove(p / "model-00002-of-00002.safetensors")
    assert "shard model-00002-of-00002.safetensors named in model.safetensors.index.json is missing" in (
        _refusal(tmp_path / "5", lambda p: missing_shard(p / "ckpt")))

    def truncated(p):
        write_checkpoint(str(p), _CONFIG, _tensors())
        with open(p / "model.safetensors", "r+b") as f:
            f.truncate(os.path.getsize(p / "model.safetensors") - 4)
    assert "does not fit" in _refusal(tmp_path / "6", lambda p: truncated(p / "ckpt"))

    def integer(p):
        write_checkpoint(str(p), _CONFIG, {"steps": np.arange(3)})
    assert "tensor 'steps' has dtype I64" in _refusal(tmp_path / "7", lambda p: integer(p / "ckpt"))

    def bad_config(p):
        write_checkpoint(str(p), _CONFIG, _tensors())
        (p / "config.json").write_text("{not json")
    assert "is not readable JSON" in _refusal(tmp_path / "8", lambda p: bad_config(p / "ckpt"))


def test_take_checks_name_and_shape():
    tensors = _tensors()
    np.testing.assert_array_equal(take(tensors, "a.weight", (3, 4)), tensors["a.weight"])
    with pytest.raises(ConversionError, match=r"^missing tensor 'x.weight'$"):
        take(tensors, "x.weight", (3, 4))
    with pytest.raises(ConversionError, match=r"^tensor 'a.weight' has shape \(3, 4\), expected \(4, 3\)$"):
        take(tensors, "a.weight", (4, 3))
