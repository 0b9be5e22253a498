"""Public MusicGen checkpoints: our converted models against transformers' own outputs (no torch here).

The fixtures (tests/fixtures/hf/, made by benchmarks/peers/fixtures_musicgen.py with transformers
4.57.6) are tiny random-weight models of each variant — musicgen, musicgen-melody, musicgen-stereo —
with their T5 tokenizer and golden outputs: a batch of two prompts, the second padded. float32 with
the highest matmul precision throughout.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melody_jax.convert.checkpoint_dir import read_checkpoint
from melody_jax.convert.hf_musicgen import musicgen_from_hf
from melody_jax.models.musicgen_lm import MusicGenLM
from melody_jax.pipelines.musicgen_sampling import generate
from melody_jax.frozen.stage_models import musicgen_model, musicgen_pattern
from melody_jax.text.t5_tokenizer import T5Tokenizer

pytestmark = pytest.mark.slow  # every variant converted and compared

FIXTURES = "tests/fixtures/hf"


@functools.cache
def converted(variant: str, scan_layers: bool = False):
    """(model, params, pattern, golden, token ids, mask) of one fixture, ids from our tokenizer."""
    c = musicgen_from_hf(read_checkpoint(f"{FIXTURES}/{variant}"), scan_layers)
    golden = dict(np.load(f"{FIXTURES}/{variant}/golden.npz", allow_pickle=False))
    ids, mask = T5Tokenizer(c.tokenizer)(list(golden["prompts"]), c.musicgen_config.model.max_text_length)
    m = c.musicgen_config.model
    return musicgen_model(m), c.musicgen_params, musicgen_pattern(m), golden, ids, mask


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def test_tokenizer_and_t5_last_hidden_state():
    model, params, _, golden, ids, mask = converted("musicgen")
    np.testing.assert_array_equal(ids, golden["input_ids"])  # tokenizer.json read by `tokenizers` = transformers'
    np.testing.assert_array_equal(mask, golden["attention_mask"].astype(bool))
    assert not mask[1].all()  # the second prompt is padded
    hidden = model.apply({"params": params}, ids, mask, method=lambda m, t, k: m.text_tower(t, k))
    err = np.abs(np.asarray(hidden) - golden["t5_hidden"]).max()
    print(f"T5 last hidden state: max |ours − transformers| = {err:.2e}")
    assert err < 1e-5


def _logits(variant: str, drop: bool = False, scan_layers: bool = False) -> tuple[np.ndarray, dict]:
    model, params, _, golden, ids, mask = converted(variant, scan_layers)
    drops = (jnp.full(2, drop), jnp.full(2, drop))
    conds = model.apply({"params": params}, ids, mask, golden.get("chroma"), *drops, method=MusicGenLM.conditions)
    return np.asarray(model.apply({"params": params}, golden["decoder_input_ids"], *conds,
                                  method=MusicGenLM.logits)), golden


@pytest.mark.parametrize("variant", ["musicgen", "musicgen-stereo"])
def test_teacher_forced_logits(variant):
    logits, golden = _logits(variant)
    assert logits.shape == golden["logits"].shape == (2, 8 if "stereo" in variant else 4, 13, 64)
    err = np.abs(logits - golden["logits"]).max()
    print(f"{variant} teacher-forced logits: max error {err:.2e} (logits up to {np.abs(golden['logits']).max():.1f})")
    assert err < 1e-4


def test_melody_logits_and_null_condition():
    logits, golden = _logits("musicgen-melody")
    null, _ = _logits("musicgen-melody", drop=True)
    assert np.abs(golden["logits"] - golden["null_logits"]).mean() > 0.1  # the conditions matter
    errors = np.abs(logits - golden["logits"]).max(), np.abs(null - golden["null_logits"]).max()
    print(f"melody logits: max error {errors[0]:.2e}, null condition {errors[1]:.2e}")
    assert max(errors) < 1e-4


@pytest.mark.parametrize("variant", ["musicgen", "musicgen-melody", "musicgen-stereo"])
def test_greedy_guided_codes_are_transformers(variant):
    model, params, pattern, golden, ids, mask = converted(variant)
    want = golden["greedy_codes"]
    assert want.shape[2] >= 24
    out = generate(model, params, pattern, ids, mask, want.shape[2], jax.random.key(0), chroma=golden.get("chroma"),
                   cfg_scale=3.0, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.codes), want)


@pytest.mark.parametrize("variant", ["musicgen", "musicgen-melody"])
def test_scanned_conversion_gives_transformers_logits_and_greedy_codes(variant):
    """`launch.convert --scan_layers`: the decoder's and T5's blocks stacked, the same parity (cross-attention
    and prepend; stereo differs from mono in the codebook count only)."""
    model, params, pattern, golden, ids, mask = converted(variant, scan_layers=True)
    assert model.scan_layers and "layers" in params and "layers" in params["text_encoder"]
    logits, _ = _logits(variant, scan_layers=True)
    assert np.abs(logits - golden["logits"]).max() < 1e-4
    out = generate(model, params, pattern, ids, mask, golden["greedy_codes"].shape[2], jax.random.key(0),
                   chroma=golden.get("chroma"), cfg_scale=3.0, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.codes), golden["greedy_codes"])


def test_unconditional_and_nucleus_sampling():
    """The null condition gives transformers' unconditional greedy codes; a nucleus of mass ~0 is greedy."""
    model, params, pattern, golden, ids, mask = converted("musicgen")
    frames = golden["uncond_codes"].shape[2]
    uncond = generate(model, params, pattern, ids, mask, frames, jax.random.key(0), temperature=0.0,
                      unconditional=True)
    np.testing.assert_array_equal(np.asarray(uncond.codes), golden["uncond_codes"])
    nucleus = generate(model, params, pattern, ids, mask, golden["greedy_codes"].shape[2], jax.random.key(1),
                       cfg_scale=3.0, temperature=1.0, top_k=2, top_p=1e-6)  # top-p replaces top-k
    np.testing.assert_array_equal(np.asarray(nucleus.codes), golden["greedy_codes"])
    sampled = generate(model, params, pattern, ids, mask, golden["greedy_codes"].shape[2], jax.random.key(1),
                       cfg_scale=3.0, temperature=1.0, top_p=0.9)
    assert (np.asarray(sampled.codes) != golden["greedy_codes"]).mean() > 0.1


def test_hub_chroma_is_one_hot_per_hop():
    """musicgen-melody's chroma (n_fft 16384, hop 4096): a 440-Hz tone is A (bin 9 from C) in every frame,
    silence is bin 0 (as transformers' argmax of an all-zero frame)."""
    from melody_jax.pipelines.musicgen import hub_chroma

    t = np.arange(32000) / 32000
    chroma = hub_chroma(np.sin(2 * np.pi * 440 * t).astype(np.float32), 32000)
    assert chroma.shape == (1 + 32000 // 4096, 12) and (chroma.sum(-1) == 1).all()
    assert (chroma.argmax(-1) == 9).all()
    assert (hub_chroma(np.zeros(8000, np.float32), 32000).argmax(-1) == 0).all()  # shorter than n_fft: padded
