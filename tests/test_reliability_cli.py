"""Issue 27, cases 4, 5 and 9: the CLIs refuse bad arguments with one `error:` line and exit 2 before any
work — sampling arguments and the output path before a bundle is loaded, config mistakes (unknown
fields, a mistyped config path, bad types) before anything runs — and a finished sample is never lost to
its spectrogram title.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import soundfile as sf

from melody_jax.pipelines.validation import (DurationError, SamplingError, check_duration, check_min_duration,
                                              check_output_path, check_sampling)
from melody_jax.training.errors import ConfigError, one_line
from tests.helpers import error_line, run_cli

pytestmark = pytest.mark.slow  # many CLI starts


GOOD = dict(seed=0, count=1, temperature=1.0, top_k=0, top_p=1.0, cfg=2.5, steps=10)


@pytest.mark.parametrize("change, message", [
    ({"seed": -1}, "--seed=-1 must lie in [0, 4294967295] (a 32-bit seed)"),
    ({"seed": 2**32}, "--seed=4294967296 must lie in [0, 4294967295] (a 32-bit seed)"),
    ({"seed": 2**32 - 2, "count": 3}, "--seed=4294967294 must lie in [0, 4294967293] (3 prompts use seeds seed … seed+2)"),
    ({"temperature": -1.0}, "--temperature=-1 must lie in [0, 100] (0 = greedy)"),
    ({"temperature": math.nan}, "--temperature must be a finite number, got nan"),
    ({"top_k": -5}, "--top_k=-5 must be >= 0 (0 = off)"),
    ({"top_p": 0.0}, "--top_p=0 must lie in (0, 1] (1 = off)"),
    ({"top_p": math.nan}, "--top_p must be a finite number, got nan"),
    ({"cfg": -5.0}, "--cfg=-5 must lie in [0, 100]"),
    ({"cfg": 1e30}, "--cfg=1e+30 must lie in [0, 100]"),
    ({"lm_cfg": -1.0}, "--lm_cfg=-1 must lie in [0, 100]"),
    ({"steps": 0}, "--steps=0 must lie in [1, 1000]"),
])
def test_case5_sampling_arguments_out_of_range_are_one_line(change, message):
    with pytest.raises(SamplingError) as e:
        check_sampling(**{**GOOD, **change})
    assert str(e.value) == message


def test_case5_sampling_arguments_in_range_pass():
    check_sampling(**GOOD)
    check_sampling(**{**GOOD, "seed": 2**32 - 1, "temperature": 0.0, "top_p": 1.0, "cfg": None})  # greedy, default cfg
    with pytest.raises(DurationError, match=r"^--duration=1e-09 s is shorter than the minimum of 0.1 s$"):
        check_min_duration(check_duration(1e-9, 3600.0))


def test_case4_output_paths_are_checked_before_generation(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "d").mkdir()
    for out, message in [(f"{tmp_path}/noext", "must end in .wav (got no extension)"),
                         (f"{tmp_path}/a.mp3", "must end in .wav (got .mp3)"),
                         (f"{tmp_path}/d", "is a folder"), (f"{tmp_path}/d/", "is a folder"),
                         (f"{tmp_path}/file.txt/x.wav", "cannot create its folder")]:
        with pytest.raises(SamplingError, match=re.escape(message)):
            check_output_path(out)
    assert check_output_path(f"{tmp_path}/new/sub/x.WAV") == f"{tmp_path}/new/sub/x.WAV"
    assert (tmp_path / "new" / "sub").is_dir() and not list((tmp_path / "new" / "sub").iterdir())  # no probe left


def test_case4_dollar_prompt_spectrogram_is_text_not_mathtext(tmp_path):
    from melody_jax.evaluation.plots import spectrogram_png

    audio = np.sin(np.linspace(0, 2000, 8000)).astype(np.float32)
    for i, title in enumerate(["$$", "$\\frac{", "price: $5 and $6", "^_{}"]):  # mathtext would fail on the first two
        spectrogram_png(audio, 8000, str(tmp_path / f"{i}.png"), title)
        assert (tmp_path / f"{i}.png").stat().st_size > 1000


def test_case4_a_failing_spectrogram_never_loses_a_wav(tmp_path, monkeypatch):
    from launch.outputs import write_outputs
    from melody_jax.evaluation import plots
    from melody_jax.pipelines.generation import Result

    def broken(audio, sr, path, title):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(plots, "spectrogram_png", broken)
    audio = np.stack([np.full(800, 0.25, np.float32), np.full(800, -0.5, np.float32)])
    result = Result(audio, 8000, {}, {}, None, None, None)
    paths = write_outputs(result, str(tmp_path / "out.wav"), ["a", "b"])
    assert paths == [str(tmp_path / "out_0.wav"), str(tmp_path / "out_1.wav")]
    for path, level in zip(paths, (0.25, -0.5)):
        written, sr = sf.read(path)
        assert sr == 8000 and len(written) == 800 and abs(written.mean() - level) < 1e-3


def test_user_error_messages_are_one_bounded_line():
    assert str(ConfigError("config.sharding.strategy=" + repr("1" * 5000) + " must be one of (...)")).endswith(
        "must be one of (...)")
    assert len(str(ConfigError("config.x=" + "1" * 5000))) < 300
    assert len(one_line("x " * 5000)) <= 600 and "\n" not in one_line("a\nb\r\nc")


@pytest.mark.parametrize("args, message", [
    (("--seed=-1",), "error: --seed=-1 must lie in [0, 4294967295] (a 32-bit seed)"),
    (("--duration=1e-9",), "error: --duration=1e-09 s is shorter than the minimum of 0.1 s"),
    (("--out=/proc/x.wav",), "error: --out='/proc/x.wav' is not writable"),
    (("--seed=abc",), "error: flag --seed=abc: invalid literal for int() with base 10: 'abc'"),
])
def test_case5_sample_cli_refuses_before_loading_the_bundle(args, message):
    """The bundle does not exist: reaching the loader would give a bundle error instead."""
    line = error_line(run_cli("launch.sample", "--bundle=/nonexistent/bundle", "--prompt=piano", *args, timeout=120))
    assert line.startswith(message), line


@pytest.mark.parametrize("args, message", [
    (("--config=configs/toy_lm.py:tiny", "--config.optim.learning_rate=1e-3"),
     "error: config.optim.learning_rate is missing"),
    (("--config=configs/toylm.py:tiny",), "error: --config=configs/toylm.py:tiny: no such config file"),
    (("--config=configs/toy_lm.py:tiny", "--config.train.num_steps=1.5"),
     "error: config.train.num_steps='1.5' must be of type int, not float"),
    (("--config=configs/toy_lm.py:tiny", "--config.sharding.strategy=" + "1" * 5000),
     "error: config.sharding.strategy='111111"),
])
def test_case9_config_mistakes_are_one_line_exit_2(tmp_path, args, message):
    line = error_line(run_cli("launch.train", f"--workdir={tmp_path}", *args, timeout=120))
    assert line.startswith(message) and len(line) < 400, line


def test_case18_inpaint_end_may_be_the_files_own_length():
    """--end=<file length> used to be refused because the audio was first trimmed to whole tokens."""
    from melody_jax.pipelines.generation import AudioInputError
    from melody_jax.pipelines.melody import inpaint_span

    samples = 24000 + 500  # 1 s of 24 kHz audio plus part of a 960-sample token
    assert inpaint_span(samples, 960, 24000, 0.5, samples / 24000) == (24000, 1.0)
    assert inpaint_span(samples, 960, 24000, 0.25, 0.75) == (24000, 0.75)
    with pytest.raises(AudioInputError, match=r"must lie within the audio's 1.02083 s"):
        inpaint_span(samples, 960, 24000, 0.5, 1.1)
    with pytest.raises(AudioInputError, match=r"starts in the audio's last 0.0208333 s, shorter than one token"):
        inpaint_span(samples, 960, 24000, 1.01, samples / 24000)
