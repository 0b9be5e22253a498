"""MusicGen's melody chroma from another segment of the clip (`data.melody_segment="other"`, issue 26):
a crop of the same clip that does not overlap the target crop when the clip holds two crops, the target
crop itself when it does not; audiocraft's `same` (the default) takes the target crop."""
import types

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_pipeline.builder import find_prepared
from melody_jax.tasks.musicgen import MusicGenTask, melody_condition
from melody_jax.tasks.sources import prepared_audio
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import make_mesh
from tests.helpers import stage_config

RATE, HOP = 32000, 640  # tiny MusicGen: 16 frames of 640 samples = 0.32-s crops


def offsets(clip: np.ndarray, crop: np.ndarray) -> set[int]:
    windows = np.lib.stride_tricks.sliding_window_view(clip, len(crop))
    return set(np.flatnonzero((windows == crop).all(axis=1)).tolist())


def first_batch(path: str, segment: str):
    """(the task's batch, the same rows from the audio iterator, the prepared clips by id)."""
    config = stage_config("musicgen", {"data.source": "codec", "data.path": path, "data.melody_segment": segment,
                                       "train.batch_size": 4, "upstream.codec": "unused"})
    MusicGenTask(config).validate()
    task = MusicGenTask(config)
    task.codec = types.SimpleNamespace(hop=HOP, variables={})  # setup() loads none: the codes are not looked at
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    batch = next(task.batches(mesh, "train"))
    data = config.data.copy_and_resolve_references()
    data.crop_seconds = 16 * HOP / RATE
    rows = prepared_audio(config, mesh, "train", with_text=True, data=data, other_segment=True).next_local()
    builder = tfds.builder_from_directory(find_prepared(path))
    clips = {int(ex["id"]): ex["audio"] for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    return task, batch, rows, clips


@pytest.mark.parametrize("clip_seconds, disjoint", [(1.0, True), (0.5, False)])
def test_chroma_comes_from_another_segment_when_the_clip_allows(prepared_data, clip_seconds, disjoint):
    path = prepared_data(source="synthetic", num_clips=4, clip_seconds=clip_seconds, sample_rate=RATE, pcm="float32",
                         min_seconds=0.25)
    task, batch, rows, clips = first_batch(path, "other")
    m = task.config.model
    crop = 16 * HOP
    for audio, other, index in zip(rows["audio"], rows["other_audio"], rows["index"]):
        clip = clips[int(index)]
        target, melody = offsets(clip, audio), offsets(clip, other)
        assert target and melody, "both crops come from the row's clip"
        if disjoint:
            assert min(abs(a - b) for a in target for b in melody) >= crop  # no shared sample
        else:
            np.testing.assert_array_equal(other, audio)  # 0.5 s holds no second 0.32-s crop
    expected = melody_condition(rows["other_audio"], RATE, HOP, m, m.melody_frames, "none")
    np.testing.assert_array_equal(np.asarray(batch["chroma"]), expected)
    np.testing.assert_array_equal(np.asarray(batch["audio"]), rows["audio"])
    if disjoint:
        assert not np.allclose(expected, melody_condition(rows["audio"], RATE, HOP, m, m.melody_frames, "none"))


def test_same_segment_is_the_default_and_other_values_are_refused(prepared_data):
    path = prepared_data(source="synthetic", num_clips=4, clip_seconds=1.0, sample_rate=RATE, pcm="float32",
                         min_seconds=0.25)
    for preset in ("tiny", "small", "base", "paper"):
        assert stage_config("musicgen", preset=preset).data.melody_segment == "same"  # audiocraft's self_wav
    task, batch, rows, _ = first_batch(path, "same")
    m = task.config.model
    np.testing.assert_array_equal(np.asarray(batch["chroma"]),
                                  melody_condition(rows["audio"], RATE, HOP, m, m.melody_frames, "none"))
    with pytest.raises(ConfigError, match=r"config.data.melody_segment='next' must be one of \('same', 'other'\)"):
        MusicGenTask(stage_config("musicgen", {"data.melody_segment": "next"})).validate()
