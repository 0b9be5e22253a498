"""`launch.tokenize` as a sharded, resumable job and the cached source that reads its shards.

The frozen stages are untrained tiny ones (what is checked — which crops, their records, shards,
resumption, the split over hosts — does not depend on trained weights); the data is a prepared
synthetic dataset of 1.5-s clips, cut into 0.64-s crops (the tiny DPD's window).
"""
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from configs.melody import TOKENIZE_STAGES
from data_pipeline.audio_io import from_pcm
from data_pipeline.builder import host_split
from data_pipeline.record_shards import ShardWriter, read_progress, write_manifest
from data_pipeline.token_records import Field, RecordIterator, serialized_rows
from data_pipeline.tokenized import FIELDS, CropSpec, FrozenStages, tokenize_dataset
from melody_jax.frozen.vae import FrozenVAE
from melody_jax.tasks.registry import get_task
from melody_jax.tasks.sources import cache_shards, read_manifest
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import DEFAULT_RULES, make_mesh
from tests.helpers import ROOT, cli_env, run_cli, stage_config

CROP = 0.64  # s: 15360 samples, 16 semantic tokens, 160 latent frames
RATE = 24000
SLIDING = CropSpec(CROP, "sliding", hop_seconds=0.32)  # 3 overlapping crops of each 1.5-s clip


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The five frozen stages `launch.tokenize` runs, untrained tiny ones, by name → directory."""
    from benchmarks.untrained import init_workdir
    from tests.bundle_fixture import tiny_configs

    root, configs = tmp_path_factory.mktemp("stages"), tiny_configs()
    for stage in TOKENIZE_STAGES:
        init_workdir(configs[stage], str(root / stage))
    return {stage: str(root / stage) for stage in TOKENIZE_STAGES}


@pytest.fixture(scope="module")
def frozen(stages):
    """The stages loaded once on all 8 devices (every run of the module shares their compiled step)."""
    return FrozenStages(stages, make_mesh({"data": -1}), DEFAULT_RULES)


@pytest.fixture
def data(prepared_data):
    return prepared_data(source="synthetic", num_clips=12, clip_seconds=1.5, sample_rate=RATE, seed=3,
                         val_fraction=0.25)


def cache_records(out: str, split: str) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Every record of `split` the manifest lists, by (clip id, crop start); duplicates fail."""
    records = {}
    for path, count in cache_shards(out, split):
        rows = [tf.train.Example.FromString(r.numpy()).features.feature for r in tf.data.TFRecordDataset(path)]
        assert len(rows) == count, f"{path}: the manifest says {count} records"
        for f in rows:
            key = (f["clip_id"].int64_list.value[0], f["crop_start"].int64_list.value[0])
            assert key not in records, f"crop {key} written twice"
            records[key] = {k: np.array(f[k].float_list.value, np.float32) if k == "latents"
                            else np.array(f[k].int64_list.value) for k in FIELDS if k in f}
    return records


def tokenize(data: str, out, frozen: FrozenStages, spec: CropSpec = SLIDING, splits=("train",), fields=FIELDS):
    return tokenize_dataset(data, list(splits), str(out), frozen, spec, 8, shard_mb=0.02, fields=fields)


def test_crop_modes():
    crop, length = int(CROP * RATE), int(3.5 * CROP * RATE)
    np.testing.assert_array_equal(CropSpec(CROP).starts(length, RATE, "train", 0), [0, crop, 2 * crop])
    sliding = CropSpec(CROP, "sliding", hop_seconds=CROP / 2).starts(length, RATE, "train", 0)
    np.testing.assert_array_equal(sliding, np.arange(6) * crop // 2)  # 6 half-overlapping crops fit in 3.5
    random = CropSpec(CROP, "random", per_clip=5, seed=1)
    draws = random.starts(length, RATE, "train", 7)
    assert len(draws) == 5 and draws.min() >= 0 and draws.max() <= length - crop
    np.testing.assert_array_equal(draws, random.starts(length, RATE, "train", 7))  # from (seed, split, clip)
    assert not np.array_equal(draws, random.starts(length, RATE, "train", 8))
    assert not np.array_equal(draws, random.starts(length, RATE, "validation", 7))
    assert all(len(CropSpec(CROP, m, 0.1, 3).starts(crop - 1, RATE, "train", 0)) == 0 for m in ("fixed", "random"))
    for bad, message in [(CropSpec(CROP, "tiles"), "--crops='tiles'"), (CropSpec(0.0), "--crop_seconds=0.0"),
                         (CropSpec(CROP, "sliding"), "--crop_hop_seconds=0.0"),
                         (CropSpec(CROP, "random", per_clip=0), "--crops_per_clip=0")]:
        with pytest.raises(ConfigError, match=message):
            bad.check()


def test_tokenize_streams_shards_and_resumes_after_a_crash(tmp_path, frozen, data, monkeypatch):
    written = tokenize(data, tmp_path / "clean", frozen, splits=("train", "validation"))
    clips = {split: clip_audio(data, split) for split in ("train", "validation")}
    for split, entry in written.items():
        expected = sum(len(SLIDING.starts(len(a), RATE, split, 0)) for a in clips[split].values())
        assert entry["records"] == expected == sum(s["records"] for s in entry["shards"])
    assert len(written["train"]["shards"]) >= 3, "0.02 MB shards: the 24 train crops fill several"
    assert written["train"]["fields"] == {"latents": [160, 16], "semantic_tokens": [16], "mulan_tokens": [12],
                                          "mulan_text_tokens": [12]}
    clean = cache_records(str(tmp_path / "clean"), "train")
    assert len(clean) == written["train"]["records"]

    # the records are the stages' outputs for those crops (cut here from the clips), and the text tokens
    # those of the crop's clip's caption as sampling makes them from a prompt
    keys = sorted(clean)[:8]
    captions = clip_captions(data, "train")
    expected = frozen(np.stack([clips["train"][c][s:s + int(CROP * RATE)] for c, s in keys]),
                      [captions[c] for c, _ in keys])
    assert set(expected) == set(clean[keys[0]])
    for field, values in expected.items():
        np.testing.assert_array_equal([clean[k][field] for k in keys], values.reshape(8, -1))
    np.testing.assert_array_equal([clean[k]["mulan_text_tokens"] for k in keys],
                                  frozen.mulan.text_tokens([captions[c] for c, _ in keys]))
    assert len({captions[c] for c, _ in keys}) > 1 and all(captions[c] for c, _ in keys)

    # a crash in the middle of the third shard: two committed, one partial; the rerun completes it
    out = tmp_path / "crashed"
    real_write, count = ShardWriter.write, [0]

    def crashing(self, record, position):
        count[0] += 1
        if count[0] > 2 * written["train"]["shards"][0]["records"] + 1:
            raise KeyboardInterrupt("killed")
        real_write(self, record, position)

    monkeypatch.setattr(ShardWriter, "write", crashing)
    with pytest.raises(KeyboardInterrupt):
        tokenize(data, out, frozen)
    monkeypatch.setattr(ShardWriter, "write", real_write)
    progress = read_progress(str(out), "train", 0)
    assert len(progress["shards"]) == 2 and not progress["done"]
    assert any(f.endswith(".partial") for f in os.listdir(out / "train")) and read_manifest(str(out)) == {}
    again = tokenize(data, out, frozen)
    assert again["train"]["records"] == written["train"]["records"]
    resumed = cache_records(str(out), "train")
    assert resumed.keys() == clean.keys()
    for key in clean:
        for field in clean[key]:
            np.testing.assert_array_equal(resumed[key][field], clean[key][field])
    listed = {os.path.basename(s["file"]) for s in again["train"]["shards"]}
    assert set(os.listdir(out / "train")) == listed | {"p00000.progress.json"}, "nothing half-written is left"

    assert tokenize(data, out, frozen)["train"] == again["train"]  # finished: a rerun changes nothing
    with pytest.raises(ConfigError, match="started with other settings"):
        tokenize(data, out, frozen, spec=CropSpec(CROP))


def test_a_cache_keeps_the_fields_its_stage_reads(tmp_path, frozen, data, monkeypatch):
    """The semantic LM's cache (configs/melody.py CACHES): the token fields alone, equal to a full cache's, with
    no VAE encoder in its compiled pass; the DPD's source refuses it in one line, and a cache started with other
    fields or an unknown field is refused before any work."""
    def no_encoder(*_):
        raise AssertionError("the VAE encoder was traced for a cache without latents")

    lm_fields = ("mulan_text_tokens", "semantic_tokens", "mulan_tokens")  # any order: FIELDS' order is kept
    monkeypatch.setattr(FrozenVAE, "encode_fn", no_encoder)  # the first pass with these fields traces them
    tokens = tokenize(data, tmp_path / "lm", frozen, fields=lm_fields)
    monkeypatch.undo()
    full = tokenize(data, tmp_path / "full", frozen)
    assert tokens["train"]["fields"] == {"semantic_tokens": [16], "mulan_tokens": [12], "mulan_text_tokens": [12]}
    assert tokens["train"]["records"] == full["train"]["records"]
    every, some = cache_records(str(tmp_path / "full"), "train"), cache_records(str(tmp_path / "lm"), "train")
    assert some.keys() == every.keys()
    for key, record in some.items():
        assert set(record) == set(lm_fields)
        for field, values in record.items():
            np.testing.assert_array_equal(values, every[key][field])

    config = stage_config("dpd", {"data.source": "cached", "data.path": str(tmp_path / "lm"), "data.eval_split": ""})
    with pytest.raises(ConfigError, match=r"holds field sizes \{'latents': 0, 'semantic_tokens': 16\}"):
        get_task(config).train_iterator(make_mesh({"data": -1}))
    with pytest.raises(ConfigError, match="started with other settings"):
        tokenize(data, tmp_path / "lm", frozen)
    for bad in ((), ("latents", "chroma")):
        with pytest.raises(ConfigError, match=r"^--fields=.*: need one or more of latents, semantic_tokens, "):
            tokenize(data, tmp_path / "bad", frozen, fields=bad)
    assert not (tmp_path / "bad").exists()


def clip_audio(data: str, split: str) -> dict[int, np.ndarray]:
    """The split's clips by id."""
    return {int(ex["id"]): from_pcm(ex["audio"]) for ex in host_split(data, split).as_numpy_iterator()}


def clip_captions(data: str, split: str) -> dict[int, str]:
    """The split's captions by clip id."""
    return {int(ex["id"]): ex["caption"].decode() for ex in host_split(data, split).as_numpy_iterator()}


def write_shards(out: str, split: str, sizes: list[int]) -> None:
    """Shards of `sizes` records (DPD fields, L = 32, T = 4), one writer each, and their manifest;
    record i's `clip_id` and latents are i."""
    start = 0
    for k, size in enumerate(sizes):
        writer = ShardWriter(out, split, k, max_bytes=1 << 30, settings={})
        ids = np.arange(start, start + size)
        rows = serialized_rows({"latents": np.broadcast_to(ids[:, None, None], (size, 32, 16)).astype(np.float32),
                                "semantic_tokens": np.broadcast_to(ids[:, None] % 8, (size, 4)),
                                "clip_id": ids[:, None]})
        for i, row in zip(ids, rows):
            writer.write(row, int(i))
        writer.finish()
        start += size
    write_manifest(out, split, len(sizes))


@pytest.mark.parametrize("sizes", [[10, 7, 12, 5, 9], [30]], ids=["by_file", "by_record"])
def test_cached_source_splits_shards_over_hosts_and_interleaves_them(tmp_path, monkeypatch, sizes):
    write_shards(str(tmp_path), "train", sizes)
    shards = cache_shards(str(tmp_path), "train")
    fields = {"latents": Field((32, 16)), "semantic_tokens": Field((4,), 8)}
    mesh = make_mesh({"data": -1})
    seen = []
    for host in (0, 1):  # two processes, each seeing only itself
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        it = RecordIterator(shards, fields, global_batch_size=8, mesh=mesh, seed=0, shuffle_buffer=4)
        epochs = [[int(tf.train.Example.FromString(r.numpy()).features.feature["clip_id"].int64_list.value[0])
                   for r in it._epoch(tf.constant(e, tf.int64))] for e in (0, 1)]
        assert len(epochs[0]) == it.epoch_size and sorted(epochs[0]) == sorted(epochs[1])
        assert epochs[0] != epochs[1], "each epoch draws its own order"
        seen.append(epochs[0])
    monkeypatch.undo()
    assert sorted(seen[0] + seen[1]) == list(range(sum(sizes))), "the hosts split the records, none twice"
    if len(sizes) > 1:  # shards are interleaved: a host's first records come from more than one file
        bounds = np.cumsum(sizes)
        assert len({int(np.searchsorted(bounds, i, side="right")) for i in seen[0][:6]}) > 1

    config = stage_config("dpd", {"data.source": "cached", "data.path": str(tmp_path), "data.latent_length": 32,
                                  "data.token_length": 4, "model.vocab_size": 8, "data.eval_split": ""})
    it = get_task(config).train_iterator(mesh)
    first = [np.asarray(next(it)["latents"])[:, 0, 0] for _ in range(3)]
    it.set_state({"batches": 2})
    np.testing.assert_array_equal(np.asarray(next(it)["latents"])[:, 0, 0], first[2])  # resumable position
    assert np.isin(np.concatenate(first), np.arange(sum(sizes))).all()


def test_a_cache_without_the_split_is_one_line(tmp_path):
    config = stage_config("dpd", {"data.source": "cached", "data.path": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"holds no finished 'train' split of a cache .*manifest.json"):
        get_task(config).train_iterator(make_mesh({"data": -1}))
    assert get_task(config).eval_iterator(make_mesh({"data": -1})) is None  # no held-out split: no evaluation


@pytest.mark.parametrize("stage", ["dpd", "semantic_lm", "musicgen"])
def test_paper_and_base_presets_read_real_data_and_need_a_path(stage):
    for preset in ("paper", "base"):
        config = stage_config(stage, preset=preset)
        assert config.data.source in ("cached", "codec")
        with pytest.raises(ConfigError, match=rf"^config.data.path is empty; data.source={config.data.source!r}"):
            get_task(config).validate()
        get_task(stage_config(stage, {"data.source": "synthetic"}, preset=preset)).validate()  # on request
    for preset in ("tiny", "small"):
        config = stage_config(stage, preset=preset)
        assert config.data.source == "synthetic"
        get_task(config).validate()


def test_paper_dpd_without_a_data_path_exits_2_naming_the_field(tmp_path):
    out = run_cli("launch.train", "--config=configs/dpd.py:paper", f"--workdir={tmp_path / 'run'}", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: config.data.path is empty; data.source='cached' needs the cache folder")
    assert not any("Traceback" in line for line in lines)


@pytest.mark.slow  # a two-process job, killed and rerun, against this process's run
def test_two_processes_tokenize_what_one_does_and_survive_kill_9(tmp_path, stages, frozen, data):
    out = tmp_path / "two"
    cmd = [sys.executable, "-m", "launch.multiprocess", "--num_processes=2", "--devices_per_process=4",
           "--module=launch.tokenize", "--timeout_s=280", "--", f"--data={data}", f"--out={out}",
           "--splits=train,validation", "--crops=sliding", f"--crop_seconds={CROP}", "--crop_hop_seconds=0.32",
           "--batch_size=8", "--shard_mb=0.0001",  # one record a shard: a kill lands between commits
           *(f"--{'vae' if s == 'vae_gan' else s}={d}" for s, d in stages.items())]
    job = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 240
    while not all((read_progress(str(out), "train", p) or {}).get("shards") for p in (0, 1)):
        assert job.poll() is None and time.time() < deadline, "the job ended before any shard was committed"
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both processes, at once
    job.wait()
    progress = [read_progress(str(out), split, p) for split in ("train", "validation") for p in (0, 1)]
    assert not all(p and p["done"] for p in progress), "killed in the middle"

    rerun = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-2000:]
    assert "[p0] train: 24 crops of 0.64 s in 24 shards" in rerun.stdout
    one = tmp_path / "one"
    tokenize(data, one, frozen, splits=("train", "validation"))
    for split in ("train", "validation"):
        files = {s["file"].split("/")[1][:6] for s in read_manifest(str(out))["splits"][split]["shards"]}
        assert files == {"p00000", "p00001"}, "each process writes its own shards"
        two, single = cache_records(str(out), split), cache_records(str(one), split)  # no duplicate in either
        assert two.keys() == single.keys(), "the union of the shards is the one-process run's crops"
        for key in single:
            np.testing.assert_allclose(two[key]["latents"], single[key]["latents"], atol=1e-6)
            np.testing.assert_array_equal(two[key]["semantic_tokens"], single[key]["semantic_tokens"])
            np.testing.assert_array_equal(two[key]["mulan_tokens"], single[key]["mulan_tokens"])
