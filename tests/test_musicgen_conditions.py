"""MusicGen's training conditions as audiocraft defines them: joint and per-condition dropout, word
dropout, description merging, the melody chroma's parameters (against librosa), HPSS."""
import collections

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from configs.musicgen import get_config
from melody_jax.tasks.musicgen import melody_condition
from melody_jax.tasks.musicgen_conditions import (augment_texts, condition_dropout, empty_text, merge_metadata,
                                                  word_dropout)
from melody_jax.text.byte_tokenizer import tokenize

DRAWS = 10_000


def _rates(drop_text, drop_melody):
    t, m = np.asarray(drop_text), np.asarray(drop_melody)
    return (t & m).mean(), t.mean(), m.mean()


@pytest.mark.parametrize("preset", ["paper", "small"])
def test_joint_null_rate_matches_closed_form(preset):
    t = get_config(preset).train
    p, pt, pm = t.cfg_dropout, t.cfg_dropout_text, t.cfg_dropout_melody
    # paper: audiocraft's chroma2music (0.2 joint, self_wav 0.5, no text attribute dropout) → 0.2;
    # small: today's independent draws (0.3, 0.2) → 0.06.
    expected = p + (1 - p) * pt * pm
    assert expected == pytest.approx({"paper": 0.2, "small": 0.06}[preset])
    draws = condition_dropout(jax.random.key(0), DRAWS, joint=p, text=pt, melody=pm, per="example")
    both, text, melody = _rates(*draws)
    assert abs(both - expected) < 0.01, (both, expected)
    assert abs(text - (p + (1 - p) * pt)) < 0.01 and abs(melody - (p + (1 - p) * pm)) < 0.01


def test_batch_scope_draws_once_per_step():
    """audiocraft draws once per step for the whole batch: every row agrees, and steps hit the rate."""
    keys = jax.random.split(jax.random.key(1), DRAWS)
    drop = jax.vmap(lambda k: condition_dropout(k, 4, joint=0.2, text=0.0, melody=0.5, per="batch"))(keys)
    text, melody = (np.asarray(d) for d in drop)  # [DRAWS, 4]
    assert (text == text[:, :1]).all() and (melody == melody[:, :1]).all()
    both, _, melody_rate = _rates(text[:, 0], melody[:, 0])
    assert abs(both - 0.2) < 0.01 and abs(melody_rate - 0.6) < 0.01


def test_default_draws_are_todays():
    """With no joint dropout the per-condition draws are exactly the ones the task made before."""
    rng = jax.random.key(3)
    k_text, k_melody = jax.random.split(rng)
    drop_text, drop_melody = condition_dropout(rng, 64, joint=0.0, text=0.3, melody=0.2)
    np.testing.assert_array_equal(drop_text, jax.random.bernoulli(k_text, 0.3, (64,)))
    np.testing.assert_array_equal(drop_melody, jax.random.bernoulli(k_melody, 0.2, (64,)))


def test_empty_text_is_the_null_text():
    _, mask = tokenize(["", "a", "violin solo"], 16)
    np.testing.assert_array_equal(empty_text(jnp.asarray(mask)), [True, False, False])


def test_word_dropout_rate():
    words = [f"w{i}" for i in range(DRAWS)]
    kept = word_dropout(" ".join(words), 0.2, np.random.default_rng(0)).split(" ")
    assert abs(1 - len(kept) / DRAWS - 0.2) < 0.01
    survivors = set(kept)
    assert kept == [w for w in words if w in survivors]  # the survivors keep their order
    assert word_dropout("violin solo", 0.0, np.random.default_rng(0)) == "violin solo"


def test_merge_metadata_format_and_rates():
    rng = np.random.default_rng(0)
    tags = "rock, piano, happy"
    merged = merge_metadata("a calm song.", tags, rng, merge_p=1.0, drop_desc_p=0.0, keep_other_p=1.0)
    head, *fields = merged.split(". ")
    assert head == "a calm song" and sorted(fields) == ["happy", "piano", "rock"]
    assert merge_metadata("a song", tags, rng, merge_p=0.0, drop_desc_p=0.5, keep_other_p=0.5) == "a song."
    # audiocraft's rates: description dropped 0.25·0.5; a tag present 0.25·0.5; text empty 0.25·0.5·0.5³.
    out = [merge_metadata("a song", tags, rng, merge_p=0.25, drop_desc_p=0.5, keep_other_p=0.5)
           for _ in range(DRAWS)]
    assert abs(np.mean([not o.startswith("a song") for o in out]) - 0.125) < 0.01
    assert abs(np.mean(["piano" in o for o in out]) - 0.125) < 0.01
    assert abs(np.mean([o == "" for o in out]) - 0.125 / 8) < 0.005
    counts = collections.Counter(o.split(". ")[1] for o in out if o.startswith("a song.") and o != "a song.")
    assert set(counts) == {"rock", "piano", "happy"}  # single kept tags appear with the description


def test_augment_texts_merges_then_drops_words():
    t = get_config("paper").train
    assert (t.word_dropout, t.merge_text_p, t.drop_desc_p, t.drop_other_p) == (0.2, 0.25, 0.5, 0.5)
    t.merge_text_p, t.word_dropout = 1.0, 0.5
    t.drop_desc_p, t.drop_other_p = 0.0, 1.0
    out = augment_texts(["ignored"] * 200, ["one two three four"] * 200, ["x, y"] * 200, np.random.default_rng(0), t)
    words = " ".join(out).replace(".", " ").split()
    assert "ignored" not in words and set(words) <= {"one", "two", "three", "four", "x", "y"}
    assert abs(len(words) / (200 * 6) - 0.5) < 0.05  # 6 words per merged text, half of them dropped


def test_melody_chroma_parameters_against_librosa():
    paper, small = get_config("paper"), get_config("small")
    assert paper.model.chroma_n_fft == 2 ** 14 and small.model.chroma_n_fft == 4096
    hop = 640 * paper.model.chroma_hop_frames  # 3840 samples: the whole-frame hop nearest audiocraft's 4096
    assert hop == 3840 and paper.data.sample_rate == 32000
    sr, rows = 32000, 8
    t = np.arange(sr) / sr
    audio = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 659.25 * t)).astype(np.float32)
    ours = melody_condition(audio, sr, 640, paper.model, rows)
    theirs = librosa.feature.chroma_stft(y=audio, sr=sr, n_fft=16384, hop_length=3840, tuning=0.0, n_chroma=12,
                                         norm=np.inf).T[:rows]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours.max(-1) == 1.0).all() and (ours.argmax(-1) == 9).all()  # max-normalised; A is bin 9
    small_rows = melody_condition(audio, sr, 640, small.model, rows)
    assert np.abs(small_rows - ours).max() > 1e-3  # the FFT size really reaches the chromagram


def test_hpss_removes_the_percussive_part():
    """A tone under noise bursts: the harmonic part's chroma is the tone's, the full mix's is smeared."""
    sr = 32000
    rng = np.random.default_rng(0)
    t = np.arange(sr) / sr
    tone = 0.2 * np.sin(2 * np.pi * 440 * t)
    bursts = np.zeros(sr)
    for start in range(0, sr, sr // 8):
        bursts[start:start + 400] = rng.normal(0, 1.0, 400) * np.exp(-np.arange(400) / 80)
    mix = (tone + bursts).astype(np.float32)
    model = get_config("small").model
    clean = melody_condition(tone.astype(np.float32), sr, 640, model, 8)
    full = melody_condition(mix, sr, 640, model, 8)
    harmonic = melody_condition(mix, sr, 640, model, 8, separation="hpss")
    err_full, err_harmonic = np.abs(full - clean).mean(), np.abs(harmonic - clean).mean()
    print(f"chroma error vs the clean tone: full mix {err_full:.3f}, harmonic part {err_harmonic:.3f}")
    assert err_harmonic < 0.5 * err_full, (err_harmonic, err_full)
    with pytest.raises(ValueError, match="separation"):
        melody_condition(mix, sr, 640, model, 8, separation="demucs")
