"""The listening room (`launch.app`): its request checks as plain functions, and the page itself
driven in headless Chromium (Debian's chromium + chromium-driver, installed by `make install`)
against `python -m launch.app` serving a tiny untrained MeLoDy bundle on 127.0.0.1."""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from launch.app import (CONTINUE, INPAINT, MAX_CANDIDATES, MELODY, TEXT, AppInputError, Batcher, Model, Request,
                        check_sampling, check_seconds, check_span, check_text, parse_request, read_clip, serve_batch)
from melody_jax.pipelines.bundle import bundle_kind
from melody_jax.pipelines.validation import MAX_PROMPT_CHARS
from melody_jax.training.errors import BundleError
from tests.helpers import ROOT, cli_env

pytestmark = pytest.mark.slow  # a browser session against a served bundle

RATE = 24000
MAX_SECONDS = 8.0


# --- the checks, without a model ---------------------------------------------------------------------
def test_bundle_kind_from_the_manifest(tmp_path):
    def manifest(name: str, stages) -> str:
        (tmp_path / name).mkdir()
        (tmp_path / name / "bundle.json").write_text(json.dumps({"stages": stages}))
        return str(tmp_path / name)

    assert bundle_kind(manifest("m", ["vae_gan", "ssl", "kmeans", "mulan", "rvq", "semantic_lm", "dpd"])) == "melody"
    assert bundle_kind(manifest("g", ["codec", "musicgen"])) == "musicgen"
    with pytest.raises(BundleError, match="neither a MeLoDy nor a MusicGen"):
        bundle_kind(manifest("x", ["codec"]))
    with pytest.raises(BundleError, match="not a bundle"):
        bundle_kind(str(tmp_path / "missing"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="damaged"):
        bundle_kind(str(tmp_path / "d"))


def test_prompt_duration_and_sampling_checks():
    assert check_text("  solo piano  ", TEXT) == "solo piano"
    assert check_text("", CONTINUE) == ""  # the clip prompts
    with pytest.raises(AppInputError, match="prompt is empty"):
        check_text("   ", TEXT)
    with pytest.raises(AppInputError, match=f"maximum is {MAX_PROMPT_CHARS}"):
        check_text("x" * (MAX_PROMPT_CHARS + 1), MELODY)
    with pytest.raises(AppInputError, match="control character"):
        check_text("a\x00b", TEXT)
    assert check_seconds(2, MAX_SECONDS) == 2.0
    for bad, message in ((9, "longer than the maximum of 8 s"), (0, "must be > 0"), (None, "number of seconds"),
                         (float("nan"), "finite")):
        with pytest.raises(AppInputError, match=message):
            check_seconds(bad, MAX_SECONDS)
    s = check_sampling(3, 2.5, 0, 1.0, 4, "uniform", 0.9)
    assert (s.seed, s.steps, s.schedule, s.top_p, s.lm_cfg, s.inpaint_candidates) == (3, 4, "uniform", 0.9, None, None)
    s = check_sampling(3, 2.5, 0, 1.0, 4, "uniform", 0.9, 3, 8)
    assert (s.lm_cfg, s.inpaint_candidates) == (3.0, 8)
    for args, message in (((1.5, 2.5, 0, 1.0), "seed must be a whole number"), ((0, 2.5, -1, 1.0), "top-k"),
                          ((0, float("inf"), 0, 1.0), "CFG scale"), ((0, 2.5, 0, 0.0), "temperature"),
                          ((0, 2.5, 0, 1.0, 0), "DPD steps"), ((0, 2.5, 0, 1.0, 4, "fast"), "schedule"),
                          ((0, 2.5, 0, 1.0, 4, "paper", 1.5), "top-p"),
                          ((0, 2.5, 0, 1.0, 4, "paper", 1.0, -1), "LM CFG scale"),
                          ((0, 2.5, 0, 1.0, 4, "paper", 1.0, 1.0, 0), "inpainting candidates"),
                          ((0, 2.5, 0, 1.0, 4, "paper", 1.0, 1.0, 2.5), "inpainting candidates"),
                          ((0, 2.5, 0, 1.0, 4, "paper", 1.0, 1.0, MAX_CANDIDATES + 1), "inpainting candidates")):
        with pytest.raises(AppInputError, match=message):
            check_sampling(*args)


def test_uploaded_clip_and_span_checks(tmp_path):
    wav = str(tmp_path / "clip.wav")
    sf.write(wav, 0.1 * np.sin(np.arange(3 * 16000) / 10), 16000)  # 3 s at 16 kHz
    assert read_clip(wav, RATE, MAX_SECONDS).shape == (3 * RATE,)  # resampled to the model's rate
    with pytest.raises(AppInputError, match="3.0 s long; the maximum is 2 s"):
        read_clip(wav, RATE, 2.0)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    with pytest.raises(AppInputError, match="notes.wav cannot be used as audio"):
        read_clip(str(text), RATE, MAX_SECONDS)
    with pytest.raises(AppInputError, match="needs an audio clip"):
        read_clip(None, RATE, MAX_SECONDS)
    assert check_span(0.5, 1.5, 3.0) == (0.5, 1.5)
    for start, end in ((2.0, 3.5), (-1, 1), (2, 2), (None, 1)):
        with pytest.raises(AppInputError, match="must be non-empty and lie within the clip's 3.00 s"):
            check_span(start, end, 3.0)


class _Recorder:
    """A pipeline double that records its calls and returns audio of the asked length (row b = seed b)."""

    sample_rate = RATE

    def __init__(self):
        self.calls = []

    def generate(self, prompts, duration, seed, **kwargs):
        from melody_jax.pipelines.generation import Result

        self.calls.append((list(prompts), list(seed), kwargs))
        audio = np.stack([np.full(int(round(duration * RATE)), 0.01 * s, np.float32) for s in seed])
        return Result(audio, RATE, {"dpd": 0.5}, {"dpd": kwargs["steps"]})

    def inpaint(self, audio, start, end, prompts, seed, **kwargs):
        self.calls.append((prompts, [seed], {"span": (start, end), **kwargs}))
        return self.generate([""], len(audio) / RATE, [seed], **kwargs)


def test_requests_that_arrive_together_share_one_batch(tmp_path):
    """Equal settings → one pipeline call with each request's seed; a bad request is its own error line."""
    pipe = _Recorder()
    models = {"m": Model("m", "melody", pipe)}

    def fields(prompt, seed, steps=4, duration=1.0):
        return ["m", TEXT, prompt, duration, seed, steps, "paper", 2.5, 0, 1.0, 1.0, None, None, None]

    out = serve_batch(models, MAX_SECONDS, str(tmp_path),
                      [fields("piano", 7), fields("drums", 9), fields("bells", 1, steps=2), fields("x", 0, duration=99)])
    assert [c[:2] for c in pipe.calls] == [(["piano", "drums"], [7, 9]), (["bells"], [1])]
    assert pipe.calls[0][2]["steps"] == 4 and pipe.calls[1][2]["steps"] == 2
    for (wav, png, stats, error), seed in zip(out[:3], (7, 9, 1)):
        audio, rate = sf.read(wav, dtype="float32")
        assert error == "" and rate == RATE and audio.shape == (RATE,) and os.path.getsize(png) > 0
        np.testing.assert_allclose(audio, 0.01 * seed)  # each request got its own row back
    assert "one batch of 2 requests" in out[0][2] and "one batch" not in out[2][2]
    assert out[3][:3] == (None, None, "") and "longer than the maximum of 8 s" in out[3][3]


def test_lm_guidance_and_inpainting_candidates_reach_the_pipeline(tmp_path):
    """The page's LM CFG scale and candidate count are the pipeline's `lm_cfg` and `inpaint_candidates`; requests
    differing in the scale are not batched together; MusicGen's requests carry neither."""
    pipe = _Recorder()
    models = {"m": Model("m", "melody", pipe), "g": Model("g", "musicgen", _Recorder())}
    wav = str(tmp_path / "clip.wav")
    sf.write(wav, np.zeros(2 * RATE), RATE)

    def fields(prompt, lm_cfg, mode=TEXT, candidates=4):
        return ["m", mode, prompt, 1.0, 0, 4, "paper", 2.5, 0, 1.0, 1.0, wav, 0.5, 1.0, lm_cfg, candidates]

    out = serve_batch(models, MAX_SECONDS, str(tmp_path),
                      [fields("piano", 3.0), fields("drums", 3.0), fields("bells", 1.0),
                       fields("", 2.0, INPAINT, candidates=7), fields("x", 2.0, INPAINT, candidates=0)])
    assert [(c[0], c[2]["lm_cfg"]) for c in pipe.calls[:3]] == [(["piano", "drums"], 3.0), (["bells"], 1.0),
                                                                   (None, 2.0)]
    assert pipe.calls[2][2]["inpaint_candidates"] == 7 and pipe.calls[2][2]["span"] == (0.5, 1.0)
    assert [o[3] for o in out[:4]] == [""] * 4
    assert out[4][3] == "error: inpainting candidates must be a whole number in [1, 16], got 0"
    req = parse_request(models, MAX_SECONDS, "g", TEXT, "piano", 1.0, 0, 4, "paper", 2.5, 0, 1.0, 1.0, None, None,
                        None, 3.0, 7)
    assert (req.sampling.lm_cfg, req.sampling.inpaint_candidates, req.sampling.steps) == (None, None, None)


def test_batcher_runs_what_arrived_during_a_run_as_the_next_batch():
    """One run at a time; the requests that queued during it run together next, at most max_batch."""
    import threading

    started, release, calls = threading.Event(), threading.Event(), []

    def serve(fields, progress):
        calls.append(list(fields))
        started.set()
        release.wait(10)
        return [f"out {f}" for f in fields]

    batcher = Batcher(serve, max_batch=2)
    results = {}

    def submit(name):
        results[name] = batcher(name)

    threads = [threading.Thread(target=submit, args=("a",))]
    threads[0].start()
    assert started.wait(10)  # "a" runs alone; b, c, d queue behind it
    for queued, name in enumerate("bcd", 1):
        threads.append(threading.Thread(target=submit, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 10
        while len(batcher._pending) < queued and time.monotonic() < deadline:  # in this order
            time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(10)
    assert calls == [["a"], ["b", "c"], ["d"]]
    assert results == {name: f"out {name}" for name in "abcd"}


def test_modes_belong_to_their_model_kind(tmp_path):
    models = {"m": Model("m", "melody", _Recorder()), "g": Model("g", "musicgen", _Recorder())}
    wav = str(tmp_path / "clip.wav")
    sf.write(wav, np.zeros(2 * RATE), RATE)
    base = dict(prompt="piano", duration=1, seed=0, steps=2, schedule="paper", cfg=2, top_k=0, top_p=1,
                temperature=1, clip_path=wav, start=0.5, end=1.0)
    req = parse_request(models, MAX_SECONDS, "m", INPAINT, **base)
    assert isinstance(req, Request) and req.span == (0.5, 1.0) and req.clip.shape == (2 * RATE,)
    assert req.batch_key() is None  # audio-conditioned requests run alone
    with pytest.raises(AppInputError, match="MusicGen offers the modes"):
        parse_request(models, MAX_SECONDS, "g", INPAINT, **base)
    with pytest.raises(AppInputError, match="choose a model"):
        parse_request(models, MAX_SECONDS, "nope", TEXT, **base)
    with pytest.raises(AppInputError, match="lie within the clip's 2.00 s"):
        parse_request(models, MAX_SECONDS, "m", INPAINT, **{**base, "end": 2.5})


# --- the page in a real browser ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m launch.app` on a free 127.0.0.1 port, serving a tiny untrained MeLoDy bundle."""
    from tests.bundle_fixture import build_bundle

    bundle = build_bundle(str(tmp_path_factory.mktemp("app_stages")))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("app_log") / "server.log", "w+")
    env = {**cli_env(1), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "launch.app", f"--bundle={bundle}", f"--port={port}",
                             f"--max_duration={MAX_SECONDS:g}"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5).read()
                break
            except OSError:
                log.seek(0)
                assert proc.poll() is None, f"the app exited: {log.read()[-3000:]}"
                assert time.monotonic() < deadline, f"the app did not answer in 180 s: {log.read()[-3000:]}"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium that can reach 127.0.0.1 only (every other host name fails to resolve)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium and chromedriver are missing: `make install` installs them (apt-get)"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1300",
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1", "--disable-background-networking",
                "--disable-component-update", "--no-first-run"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_page_load_timeout(60)
    d.set_script_timeout(60)
    try:
        yield d
    finally:
        d.quit()


def _fill(browser, url: str, prompt: str, duration: str, steps: str | None = None, lm_cfg: str | None = None) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prompt textarea"))
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").send_keys(prompt)
    for selector, value in (("#duration input", duration), ("#steps input[type=number]", steps),
                            ("#lm_cfg input", lm_cfg)):
        if value is not None:
            field = browser.find_element(By.CSS_SELECTOR, selector)
            field.send_keys(Keys.CONTROL, "a")
            field.send_keys(value, Keys.TAB)
    browser.find_element(By.CSS_SELECTOR, "#generate").click()


def _error_text(browser) -> str:
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, "#error").text


def test_page_generates_audio_of_the_requested_length(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _fill(browser, server, "solo piano, slow", "1.25", steps="2")
    link = "#output_audio a[download]"
    WebDriverWait(browser, 240).until(lambda d: d.find_elements(By.CSS_SELECTOR, link) or _error_text(d))
    assert _error_text(browser) == ""
    assert browser.find_elements(By.CSS_SELECTOR, "#output_audio audio"), "no audio element in the output"
    wav_url = browser.find_element(By.CSS_SELECTOR, link).get_attribute("href")
    # the browser's own decoder reads the WAV the player plays
    seconds = browser.execute_async_script(
        "const done = arguments[1], a = new Audio(arguments[0]);"
        "a.onloadedmetadata = () => done(a.duration); a.onerror = () => done(-1);", wav_url)
    assert abs(seconds - 1.25) < 1e-3
    audio, rate = sf.read(io.BytesIO(urllib.request.urlopen(wav_url, timeout=30).read()), dtype="float32")
    assert rate == RATE and audio.shape == (int(1.25 * RATE),) and np.isfinite(audio).all()
    assert audio.std() > 0  # an untrained model makes noise, not silence
    stats = browser.find_element(By.CSS_SELECTOR, "#stats").text
    assert "dpd" in stats and "real-time factor" in stats
    assert browser.find_element(By.CSS_SELECTOR, "#spectrogram img").get_attribute("src")


def test_page_shows_one_error_line_for_a_long_duration_lm_guidance_it_lacks_and_non_audio(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _fill(browser, server, "drums, fast", "60")
    WebDriverWait(browser, 60).until(_error_text)
    assert _error_text(browser) == "error: duration=60 s is longer than the maximum of 8 s"
    assert not browser.find_elements(By.CSS_SELECTOR, "#output_audio a[download]")
    assert "Traceback" not in browser.page_source

    # LM guidance asked of a bundle whose semantic LM never trained on the null prefix
    _fill(browser, server, "drums, fast", "1", steps="2", lm_cfg="2")
    WebDriverWait(browser, 240).until(_error_text)
    assert _error_text(browser).startswith("error: lm_cfg=2.0 needs a semantic LM trained with model.cfg_dropout > 0")

    # continuation of an uploaded file that is not audio
    browser.get(server)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#clip input[type=file]"))
    bogus = tmp_path / "letter.wav"
    bogus.write_text("Dear listener, this is text.")
    browser.find_element(By.CSS_SELECTOR, "#clip input[type=file]").send_keys(str(bogus))
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#clip [aria-label='letter.wav']"))
    next(e for e in browser.find_elements(By.CSS_SELECTOR, "#mode label") if e.text == CONTINUE).click()
    browser.find_element(By.CSS_SELECTOR, "#generate").click()
    WebDriverWait(browser, 60).until(_error_text)
    assert _error_text(browser).startswith("error: the clip letter.wav cannot be used as audio")
