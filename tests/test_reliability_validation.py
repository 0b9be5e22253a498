"""The sampling pipeline's argument checks: durations and prompts fail as one-line UserErrors."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from melody_jax.pipelines.validation import DurationError, PromptError, check_duration, check_prompt
from melody_jax.training.errors import UserError

ANY_CHAR = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=())


@pytest.mark.parametrize("seconds, message", [
    (0, "--duration must be > 0 seconds, got 0"),
    (-3.5, "--duration must be > 0 seconds, got -3.5"),
    (float("nan"), "--duration must be a finite number of seconds, got nan"),
    (float("inf"), "--duration must be a finite number of seconds, got inf"),
    (1e9, "--duration=1e+09 s is longer than the maximum of 600 s"),
    (600.5, "--duration=600.5 s is longer than the maximum of 600 s"),
    ("10", "--duration must be a number of seconds, got '10'"),
    (True, "--duration must be a number of seconds, got True"),
    (None, "--duration must be a number of seconds, got None"),
])
def test_bad_durations_are_one_line_user_errors(seconds, message):
    with pytest.raises(DurationError) as e:
        check_duration(seconds, 600.0)
    assert str(e.value) == message and isinstance(e.value, UserError)


def test_good_durations_pass_as_floats():
    assert check_duration(10, 600.0) == 10.0 and isinstance(check_duration(10, 600.0), float)
    assert check_duration(600.0, 600.0) == 600.0 and check_duration(1e-3, 600.0) == 1e-3


@pytest.mark.parametrize("text, message", [
    ("x" * 10_000, "--prompt has 10000 characters; the maximum is 2000"),
    ("piano\x00solo", "--prompt holds the control character U+0000 at character 5"),
    ("a\x1b[31mred", "--prompt holds the control character U+001B at character 1"),
    ("piano \ud83c", "--prompt holds a lone surrogate U+D83C at character 6 (not valid UTF-8)"),
    (b"piano", "--prompt must be text, got bytes"),
    (None, "--prompt must be text, got NoneType"),
])
def test_bad_prompts_are_one_line_user_errors(text, message):
    with pytest.raises(PromptError) as e:
        check_prompt(text, 2000)
    assert str(e.value) == message and isinstance(e.value, UserError)


def test_prompts_are_stripped_and_empty_is_unconditional_unless_refused():
    assert check_prompt("  slow piano in C minor 🎹\n", 2000) == "slow piano in C minor 🎹"
    assert check_prompt("", 2000) == "" and check_prompt(" \t\n", 2000) == ""
    with pytest.raises(PromptError, match=r"^--text is empty$"):
        check_prompt("   ", 2000, allow_empty=False, name="text")
    assert check_prompt("x" * 2000, 2000) == "x" * 2000


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(ANY_CHAR, max_size=300), st.binary(max_size=20), st.integers(), st.floats(), st.none()),
       st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10**400, 10**400), st.text(max_size=5),
                 st.none(), st.booleans()))
def test_checks_accept_or_raise_one_line_user_errors_only(text, seconds):
    for check in (lambda: check_prompt(text, 200), lambda: check_duration(seconds, 120.0)):
        try:
            value = check()
        except UserError as e:
            assert "\n" not in str(e) and len(str(e)) < 200, str(e)
            continue
        if isinstance(value, str):
            value.encode("utf-8")  # strict: an accepted prompt always reaches the tokenizer intact
            assert len(value) <= 200
        else:
            assert isinstance(value, float) and math.isfinite(value) and 0 < value <= 120.0
