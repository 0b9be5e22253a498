"""Training input: crops and masks, global batches on 8 devices, per-host splits, determinism, resume."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import PartitionSpec

from data_pipeline.builder import find_prepared
from data_pipeline.input import default_data_config, make_train_iterator
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import make_mesh

SR = 8000
CLIP_S = 3.0
N_CLIPS = 12


@pytest.fixture(scope="module")
def dataset(prepared_data) -> str:
    return prepared_data(source="synthetic", num_clips=N_CLIPS, seed=2, clip_seconds=CLIP_S, sample_rate=SR)


@pytest.fixture(scope="module")
def stored(dataset) -> dict[int, np.ndarray]:
    """id → the full stored clip as float32, to check crops against."""
    ds = tfds.builder_from_directory(find_prepared(dataset)).as_dataset(split="train")
    return {int(ex["id"]): ex["audio"].astype(np.float32) / 32768.0 for ex in tfds.as_numpy(ds)}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def config(dataset: str, crop_seconds: float = 2.0, shuffle_buffer: int = 8):
    c = default_data_config()
    c.path, c.sample_rate, c.crop_seconds, c.shuffle_buffer = dataset, SR, crop_seconds, shuffle_buffer
    return c


def test_global_batch_shapes_and_sharding(dataset, mesh, stored):
    assert jax.device_count() == 8
    it = make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=0)
    batch = next(it)
    crop = int(2.0 * SR)
    assert batch["audio"].shape == (8, crop) and batch["audio"].dtype == np.float32
    assert batch["mask"].shape == (8, crop) and batch["index"].shape == (8,) and batch["index"].dtype == np.int32
    for key in ("audio", "mask", "index"):
        assert isinstance(batch[key], jax.Array)
        assert batch[key].sharding.spec == PartitionSpec(("data", "fsdp"), *([None] * (batch[key].ndim - 1)))
        assert len(batch[key].addressable_shards) == 8
        assert {s.data.shape[0] for s in batch[key].addressable_shards} == {1}  # one row per device
    assert batch["caption"].shape == (8,) and all(isinstance(c, str) and c for c in batch["caption"])
    assert all("bpm" in t for t in batch["tags"])
    assert all(json.loads(a)["tempo_bpm"] >= 60 for a in batch["attributes"])
    # Clips (3 s) are longer than crops (2 s): all real audio, and each crop is a slice of its clip.
    assert float(np.min(batch["mask"])) == 1.0
    audio, index = np.asarray(batch["audio"]), np.asarray(batch["index"])
    for row, i in zip(audio, index):
        windows = np.lib.stride_tricks.sliding_window_view(stored[int(i)], 32)
        starts = np.flatnonzero(np.all(windows == row[:32], axis=1))
        assert any(np.array_equal(stored[int(i)][s : s + crop], row) for s in starts)


def test_audio_only_batches_hold_jax_arrays_only(dataset, mesh):
    batch = next(make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=0, with_text=False))
    assert set(batch) == {"audio", "mask", "index"} and all(isinstance(v, jax.Array) for v in batch.values())


def test_short_clips_are_padded_with_mask(dataset, mesh):
    it = make_train_iterator(config(dataset, crop_seconds=4.0), global_batch_size=8, mesh=mesh, seed=0)
    batch = next(it)
    audio, mask = np.asarray(batch["audio"]), np.asarray(batch["mask"])
    assert audio.shape == (8, 4 * SR)
    np.testing.assert_array_equal(mask.sum(axis=1), np.full(8, CLIP_S * SR))  # 3 s real, then padding
    assert np.all(mask[:, : int(CLIP_S * SR)] == 1) and np.all(audio[:, int(CLIP_S * SR) :] == 0)


def test_deterministic_for_a_seed(dataset, mesh):
    def take(seed: int, n: int = 3) -> list[dict]:
        it = make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=seed)
        return [it.next_local() for _ in range(n)]

    a, b, c = take(5), take(5), take(6)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["audio"], y["audio"])
        np.testing.assert_array_equal(x["index"], y["index"])
        assert list(x["caption"]) == list(y["caption"])
    assert not all(np.array_equal(x["index"], z["index"]) and np.array_equal(x["audio"], z["audio"])
                   for x, z in zip(a, c))


def test_per_host_splits_are_disjoint_and_cover(dataset, mesh):
    seen = []
    for process in range(2):
        it = make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=0,
                                 process_index=process, process_count=2)
        assert it.local_batch_size == 4 and it.examples_per_epoch == N_CLIPS // 2
        ids = np.concatenate([it.next_local()["index"] for _ in range(2)])[: N_CLIPS // 2]  # one epoch
        assert len(set(ids.tolist())) == N_CLIPS // 2  # every example of the host's share once
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(N_CLIPS))


def test_epochs_reshuffle_and_cover(dataset, mesh):
    it = make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=1)
    order = np.concatenate([it.next_local()["index"] for _ in range(3)])  # two epochs of 12
    assert sorted(order[:12].tolist()) == sorted(order[12:].tolist()) == list(range(N_CLIPS))
    assert order[:12].tolist() != order[12:].tolist()


@pytest.mark.parametrize("consumed_batches", [2, 5])  # 5 batches of 8 = 40 examples: restore in epoch 3
def test_save_and_restore_continues_with_next_batch(dataset, mesh, consumed_batches):
    it = make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=3)
    for _ in range(consumed_batches):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # stored as JSON in the checkpoint
    assert state["examples_consumed"] == 8 * consumed_batches and len(json.dumps(state)) < 200
    expected = [next(it) for _ in range(2)]
    restored = make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=3)
    restored.set_state(state)
    for want in expected:
        got = next(restored)
        np.testing.assert_array_equal(np.asarray(got["audio"]), np.asarray(want["audio"]))
        np.testing.assert_array_equal(np.asarray(got["index"]), np.asarray(want["index"]))
        assert list(got["caption"]) == list(want["caption"])
    with pytest.raises(ValueError, match="seed"):
        make_train_iterator(config(dataset), global_batch_size=8, mesh=mesh, seed=4).set_state(state)


def test_bad_configs_are_one_line_errors(dataset, mesh, tmp_path):
    with pytest.raises(ConfigError, match="sample_rate"):
        c = config(dataset)
        c.sample_rate = 24000
        make_train_iterator(c, global_batch_size=8, mesh=mesh, seed=0)
    with pytest.raises(ConfigError, match="divisible"):
        make_train_iterator(config(dataset), global_batch_size=6, mesh=mesh, seed=0)
    with pytest.raises(ConfigError, match="data.path"):
        make_train_iterator(config(str(tmp_path)), global_batch_size=8, mesh=mesh, seed=0)
