"""Property-based fuzzing of the text paths a user controls: config overrides, manifest and CSV lines,
captions into the tokenizer, the sampling CLI's arguments and output path. Only the project's declared errors may escape (ConfigError for configs,
a counted skip for data), never a TypeError/RecursionError/UnicodeError from deep inside.

(The tokenizer alone is fuzzed in test_mulan.py; here it is reached through the manifest.) Every run
explores the same inputs: tests/conftest.py loads a derandomized Hypothesis profile.
"""
from __future__ import annotations

import json
import math
import os
import string

import ml_collections
import numpy as np
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from configs.toy_lm import get_config
from data_pipeline import audio_io, sources
from melody_jax.pipelines.validation import SEED_LIMIT, SamplingError, check_output_path, check_sampling
from melody_jax.text.byte_tokenizer import VOCAB_SIZE, tokenize
from melody_jax.training.config import apply_overrides, get_field, parse_value, validate_common, validate_optimization
from melody_jax.training.errors import ConfigError

ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())  # incl. lone surrogates
BASE = get_config("tiny")


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += _leaves(value, f"{prefix}{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


FIELDS = sorted(_leaves(BASE))
NASTY_VALUES = st.one_of(
    st.text(ANY_CHAR, max_size=60),
    st.sampled_from(["nan", "NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 5000, "true", "null",
                     "[" * 5000 + "]" * 5000, '{"a": {"b": [1, 2]}}', "[]", "{}", "-0", "0x10", "1_000", " 3 "]),
    st.integers(-10**30, 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                 max_leaves=8).map(json.dumps),
)
KEYS = st.one_of(st.sampled_from(FIELDS), st.sampled_from(FIELDS).map(lambda f: f + ".x"),
                 st.text(ANY_CHAR, max_size=20), st.lists(st.sampled_from(["train", "mesh", "seed", "", "x", "lr"]),
                                                          min_size=1, max_size=4).map(".".join))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, NASTY_VALUES, min_size=1, max_size=3))
@example({"seed.x": "1"})  # found: a TypeError from descending into an int
@example({"seed": "[" * 100_000 + "]" * 100_000})  # found: RecursionError from json
@example({"optim.lr": "1" + "0" * 400})  # found: OverflowError converting a huge int to a float
@example({"optim.lr": "Infinity"})  # found: lr=inf passed validation
@example({"mesh.data": '{"a": 1}'})  # found: a multi-line ConfigDict message
@example({"seed": "true"})  # found: a bool accepted as the integer seed
@example({"sharding_rules": "[null]"})  # found: a message that named no field
@example({"\n": ""})  # found: a newline in a field name broke the one-line message
@example({"sharding.strategy": "1" * 5000})  # found: the whole value echoed into the one-line message
@example({"sharding.strategy": "x " * 3000})  # the same, with spaces: bounded as a whole
@example({"train.init_from": "2024"})  # a text field keeps the text (a path named 2024), as config_flags did
def test_config_overrides_raise_only_config_errors(overrides):
    try:
        config = apply_overrides(BASE, overrides)
        validate_common(config)
        validate_optimization(config)
    except ConfigError as e:
        message = str(e)
        assert message.startswith("config.") and "\n" not in message and len(message) <= 600, message
        return
    for dotted in overrides:  # accepted: each value kept its field's type (or was set to None)
        old, new = get_field(BASE, dotted), get_field(config, dotted)
        if new is not None and isinstance(old, (int, float, str)) and not isinstance(old, bool):
            assert type(new) is type(old), (dotted, old, new)
    assert isinstance(config.seed, int) and not isinstance(config.seed, bool)
    assert math.isfinite(config.optim.lr) and config.optim.lr > 0


@settings(max_examples=200, deadline=None)
@given(st.text(ANY_CHAR, max_size=200))
@example("[" * 10_000)
@example("1" * 5000)
def test_parse_value_is_total(text):
    """Any text parses to a JSON value or stays itself; JSON text round-trips."""
    value = parse_value(text)
    if isinstance(value, str) and value != text:
        assert json.loads(text) == value  # a JSON string literal
    if text.strip().lower() in ("true", "false"):
        assert value is (text.strip().lower() == "true")


MANIFEST_LINE = st.one_of(
    st.binary(max_size=300),
    st.text(ANY_CHAR, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries(
        {"path": st.text(ANY_CHAR, min_size=1, max_size=20)},
        optional={"caption": st.one_of(st.text(ANY_CHAR, max_size=300), st.integers(), st.none(),
                                       st.text(ANY_CHAR, min_size=1, max_size=3).map(lambda t: t * 4000)),
                  "tags": st.one_of(st.text(ANY_CHAR, max_size=30), st.lists(st.text(ANY_CHAR, max_size=10)),
                                    st.integers(), st.dictionaries(st.text(max_size=3), st.integers())),
                  "start_s": st.one_of(st.floats(), st.text(max_size=5), st.integers(-10**20, 10**20)),
                  "end_s": st.one_of(st.floats(), st.none(), st.booleans())},
    ).map(lambda d: json.dumps(d).encode("utf-8")),
)


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(MANIFEST_LINE.map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" ")), min_size=1, max_size=6))
@example([b'{"path": "a.wav", "caption": "\xff\xfe piano"}'])  # found: non-UTF-8 bytes stopped the listing
@example([b'{"path": "a.wav", "caption": "\\ud800"}'])  # found: a lone surrogate reached the TFDS writer
@example([b'{"path": "a.wav", "start_s": Infinity}'])  # found: OverflowError while decoding
@example([b'[' * 50_000])
def test_manifest_lines_become_items_or_counted_skips(tmp_path_factory, lines):
    manifest = tmp_path_factory.mktemp("m") / "m.jsonl"
    manifest.write_bytes(b"\n".join(lines) + b"\n")
    items = list(sources.manifest_items(str(manifest)))
    assert len(items) == sum(1 for line in lines if line.strip())
    for item in items:
        item.key.encode("utf-8")  # every key can be written to the report and the dataset
        if item.error:
            assert item.error[0] == audio_io.BAD_ENTRY and "\n" not in item.error[1]
            continue
        for text in (item.caption, *item.tags):
            text.encode("utf-8")  # strict: what the TFDS Text feature does
        assert len(item.caption) <= sources.MAX_CAPTION_CHARS
        for t in (item.start_s, item.end_s):
            assert t is None or math.isfinite(t)
        tokens, mask = tokenize([item.caption], 64)  # the caption path into the text tower
        assert tokens.shape == (1, 64) and 0 <= tokens.min() and tokens.max() < VOCAB_SIZE and mask[0, 0]


CSV_CELL = st.one_of(st.text(string.printable, max_size=10), st.sampled_from(["inf", "nan", "-1", "1e999", ""]),
                     st.binary(max_size=8).map(lambda b: b.decode("latin-1")))
YTID = st.sampled_from(["in", "../out", "..", "/tmp", "a/../in", "in\\x", "missing"])  # in.wav and out.wav exist
GOOD_ROW = st.tuples(YTID, st.sampled_from(["0", "10"]), st.just("20")).map(list)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.one_of(st.lists(CSV_CELL, min_size=0, max_size=6), GOOD_ROW), max_size=6), st.binary(max_size=40))
@example([["in", "0", "20"], ["in", "0", "20"]], b"")  # found: two rows, one key → DuplicatedKeysError
@example([["../out", "0", "20"]], b"")  # found: a ytid read outside --audio_dir
def test_musiccaps_csv_rows_become_items_or_counted_skips(tmp_path_factory, rows, junk):
    root = tmp_path_factory.mktemp("c")
    (root / "audio").mkdir()
    for wav in (root / "audio" / "in.wav", root / "out.wav"):
        wav.write_bytes(b"RIFF")  # never decoded here: only found
    body = "ytid,start_s,end_s,aspect_list,caption\n".encode() + b"".join(
        (",".join(r).encode("latin-1", "replace") + b"\n") for r in rows) + junk
    (root / "mc.csv").write_bytes(body)
    try:
        items = list(sources.list_items("musiccaps", input_path=str(root / "mc.csv"), audio_dir=str(root / "audio")))
    except ValueError as e:  # csv's own errors (e.g. a NUL byte) are declared: prepare makes them PrepareError
        assert "\n" not in str(e)
        return
    usable = [item.key for item in items if item.error is None]
    assert len(set(usable)) == len(usable)  # the dataset writer needs unique keys
    for item in items:
        item.key.encode("utf-8")
        if item.error is None:
            assert os.path.dirname(item.path) == str(root / "audio"), item.path  # confined to --audio_dir
        else:
            assert item.error[0] in (audio_io.BAD_ENTRY, audio_io.MISSING, audio_io.DUPLICATE)


def test_tokenizer_takes_empty_and_10000_character_prompts():
    """The prompt path of DESIGN §4.3: "" is one [CLS] token; 10,000 characters truncate to the window."""
    long = ("piano, slow, 🎹 " * 700)[:10_000]
    tokens, mask = tokenize(["", long], 128)
    assert mask.sum(axis=1).tolist() == [1, 128]
    np.testing.assert_array_equal(tokens[1, 1:], np.frombuffer(long.encode("utf-8")[:127], np.uint8) + 2)


SAMPLING_NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70),
                            st.sampled_from([0, 1, -1, 0.5, 1e30, -5, 2**32 - 1, 2**32]), st.booleans(), st.none(),
                            st.text(max_size=4))


@settings(max_examples=300, deadline=None)
@given(seed=SAMPLING_NUMBER, count=st.integers(1, 4), temperature=SAMPLING_NUMBER, top_k=SAMPLING_NUMBER,
       top_p=SAMPLING_NUMBER, cfg=SAMPLING_NUMBER, steps=SAMPLING_NUMBER)
@example(seed=-1, count=1, temperature=1.0, top_k=0, top_p=1.0, cfg=2.5, steps=10)  # found: OverflowError
@example(seed=2**32, count=1, temperature=1.0, top_k=0, top_p=1.0, cfg=2.5, steps=10)
@example(seed=0, count=1, temperature=math.nan, top_k=0, top_p=1.0, cfg=2.5, steps=10)  # found: accepted
@example(seed=0, count=1, temperature=1.0, top_k=-5, top_p=math.nan, cfg=1e30, steps=10)
def test_sampling_arguments_are_accepted_in_range_or_one_line_errors(seed, count, temperature, top_k, top_p, cfg,
                                                                     steps):
    try:
        check_sampling(seed=seed, count=count, temperature=temperature, top_k=top_k, top_p=top_p, cfg=cfg,
                       steps=steps)
    except SamplingError as e:
        assert str(e).startswith("--") and "\n" not in str(e) and len(str(e)) < 200, str(e)
        return
    assert isinstance(seed, int) and not isinstance(seed, bool)  # None (the bundle's) is allowed for the rest
    for value in (top_k, steps):
        assert value is None or (isinstance(value, int) and not isinstance(value, bool))
    assert 0 <= seed and seed + count - 1 < SEED_LIMIT  # every prompt's seed is a uint32
    np.asarray([seed + i for i in range(count)], np.uint32)  # what melody.row_keys does with them
    assert (top_k is None or top_k >= 0) and (steps is None or 1 <= steps)
    assert temperature is None or (math.isfinite(temperature) and temperature >= 0)
    assert top_p is None or 0 < top_p <= 1
    assert cfg is None or (math.isfinite(cfg) and cfg >= 0)


OUT_NAME = st.one_of(st.text(ANY_CHAR, max_size=30),
                     st.sampled_from(["out", "out.mp3", "out.WAV", "sub/out.wav", "sub/", "", "..", "a.wav/b.wav",
                                      "file.txt/x.wav", "x.wav\x00", "dir"]))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(OUT_NAME)
def test_output_paths_are_writable_wavs_or_one_line_errors(tmp_path_factory, name):
    root = tmp_path_factory.mktemp("o")
    (root / "file.txt").write_text("not a folder")
    (root / "dir").mkdir()
    try:
        path = check_output_path(f"{root}/{name.replace('..', '__')}")  # never above the scratch folder
    except SamplingError as e:
        assert str(e).startswith("--out") and "\n" not in str(e) and len(str(e)) < 300, str(e)
        return
    assert path.lower().endswith(".wav") and os.path.isabs(path) and not os.path.isdir(path)
    assert os.path.isdir(os.path.dirname(path))
    with open(path, "ab"):  # the promise: soundfile can open it for writing
        pass
