"""MusicGen sampling as audiocraft defines it (issue 26): two-step CFG equals the one-pass batch, double
CFG (`cfg_coef_beta`) against a hand computation, and top-p against the truncated softmax — the shared
filter (MusicGen's and the semantic LM's) on masked logits with ties, and the MusicGen sampler's draws."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs.musicgen import get_config
from melody_jax.pipelines.lm_sampling import filter_logits
from melody_jax.pipelines.musicgen_sampling import generate, teacher_forced_logits
from melody_jax.pipelines.validation import SamplingError, check_sampling
from melody_jax.tasks.musicgen import MusicGenTask, synthetic_examples
from melody_jax.text.byte_tokenizer import tokenize
from melody_jax.training.errors import ConfigError
from tests.helpers import run_cli, stage_config

V = 64  # the tiny preset's codebook size


@pytest.fixture(scope="module")
def tiny():
    """An untrained tiny MusicGen LM and two synthetic examples (codes, chroma, text)."""
    task = MusicGenTask(stage_config("musicgen"))
    params = nn.meta.unbox(task.init_params(jax.random.key(0)))
    m = task.config.model
    ex = synthetic_examples(7, 0, 2, frames=task.config.data.frames, num_codebooks=m.num_codebooks, codebook_size=V,
                            chroma_hop=m.chroma_hop_frames, melody_frames=m.melody_frames, max_note_frames=4)
    ex["tokens"], ex["mask"] = tokenize(ex["texts"], m.max_text_length)
    ex["seq"] = task.pattern.build(ex["codes"], V)
    return task, params, ex


def branch_logits(task, params, ex):
    """Full forwards of the three branches: conditional, text nulled (melody kept), both nulled."""
    def apply(drop_text, drop_melody):
        return np.asarray(task.model.apply({"params": params}, ex["seq"], ex["tokens"], ex["mask"], ex["chroma"],
                                           jnp.full(2, drop_text), jnp.full(2, drop_melody)), np.float64)
    return apply(False, False), apply(True, False), apply(True, True)


def test_two_step_cfg_equals_the_one_pass_batch(tiny):
    task, params, ex = tiny
    args = (task.model, params, ex["seq"], ex["tokens"], ex["mask"], ex["chroma"])
    for beta in (None, 2.0):
        one = np.asarray(teacher_forced_logits(*args, cfg_scale=3.0, cfg_beta=beta))
        two = np.asarray(teacher_forced_logits(*args, cfg_scale=3.0, cfg_beta=beta, two_step_cfg=True))
        np.testing.assert_allclose(two, one, atol=1e-5 * np.abs(one).max())
    kwargs = dict(chroma=ex["chroma"], cfg_scale=3.0, temperature=0.0)
    batched, separate = (generate(task.model, params, task.pattern, ex["tokens"], ex["mask"], 16, jax.random.key(0),
                                  two_step_cfg=two_step, **kwargs) for two_step in (False, True))
    np.testing.assert_array_equal(np.asarray(separate.codes), np.asarray(batched.codes))
    assert separate.forward_passes == 2 * batched.forward_passes  # one decoder call per branch


def test_double_cfg_is_audiocrafts_formula(tiny):
    """logits = u + s·(w + β·(c − w) − u): c conditional, w melody only, u null (lm.py, MusicGen-Style §4.3)."""
    task, params, ex = tiny
    c, w, u = branch_logits(task, params, ex)
    assert min(np.abs(c - w).mean(), np.abs(w - u).mean()) > 0.05  # the three branches really differ
    s, beta = 3.0, 2.0
    got = teacher_forced_logits(task.model, params, ex["seq"], ex["tokens"], ex["mask"], ex["chroma"], cfg_scale=s,
                                cfg_beta=beta)
    np.testing.assert_allclose(got, u + s * (w + beta * (c - w) - u), atol=1e-4)
    plain = teacher_forced_logits(task.model, params, ex["seq"], ex["tokens"], ex["mask"], ex["chroma"], cfg_scale=s,
                                  cfg_beta=1.0)  # β = 1 is plain CFG
    np.testing.assert_allclose(plain, u + s * (c - u), atol=1e-4)


def test_guidance_options_are_validated():
    for preset in ("tiny", "small", "base", "paper"):  # audiocraft's defaults everywhere
        sample = get_config(preset).sample
        assert (sample.two_step_cfg, sample.cfg_beta) == (False, None)
    with pytest.raises(ConfigError, match=r"config.sample.cfg_beta=2.0 must be None \(plain CFG\) or a finite"):
        MusicGenTask(stage_config("musicgen", {"sample.cfg_beta": 2.0, "model.use_melody": False})).validate()
    with pytest.raises(SamplingError, match=r"^--cfg_beta=-1 must lie in \[0, 100\]$"):
        check_sampling(seed=0, cfg_beta=-1.0)
    with pytest.raises(SamplingError, match=r"^--inpaint_candidates=0 must lie in \[1, 64\]$"):
        check_sampling(seed=0, inpaint_candidates=0)


@pytest.mark.parametrize("flag, error", [
    ("--cfg_beta=nan", "error: --cfg_beta must be a finite number, got nan"),
    ("--inpaint_candidates=0", "error: --inpaint_candidates=0 must lie in [1, 64]"),
    ("--lm_cfg=nan", "error: --lm_cfg must be a finite number, got nan"),
    ("--schedule=cosine", "error: flag --schedule=cosine: value should be one of <paper|uniform>")])
def test_sample_cli_refuses_bad_guidance_and_schedule_flags(flag, error):
    """Before any bundle is read (the path does not exist): one line, exit 2."""
    proc = run_cli("launch.sample", "--bundle=/nonexistent", "--prompt=x", flag, timeout=120, devices=1)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [error], proc.stderr[-2000:]


def nucleus_reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """NumPy, float64: which tokens survive top-k (every logit tied with the k-th kept), then top-p — the
    smallest set, by probability, whose renormalised mass reaches p, plus every token tied with its least
    likely member (a set that does not depend on how ties are ordered)."""
    z = logits.astype(np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if 0 < top_k < len(z):
        keep = z >= np.sort(z)[::-1][top_k - 1]
    p = np.where(keep, np.exp(z - z.max()), 0.0)
    p /= p.sum()
    ordered = np.sort(p)[::-1]
    last = int(np.searchsorted(np.cumsum(ordered), top_p)) if top_p < 1 else int(keep.sum()) - 1
    return keep & (p >= ordered[min(last, len(z) - 1)])


def test_top_k_and_top_p_mask_exactly_the_truncated_set():
    rng = np.random.default_rng(0)
    logits = rng.integers(-4, 5, (400, 12)).astype(np.float32) / 2  # 9 values over 12 tokens: ties everywhere
    settings = [(t, k, p) for t in (0.5, 1.0, 2.0) for k in (0, 1, 3, 5) for p in (0.3, 0.6, 0.9, 1.0)]
    checked = 0
    for i, (temperature, top_k, top_p) in enumerate(settings):
        rows = logits[i::len(settings)]
        got = np.asarray(filter_logits(jnp.asarray(rows), temperature, top_k, top_p))
        for row, out in zip(rows, got):
            z = row.astype(np.float64) / temperature
            p = np.exp(z - z.max()) * nucleus_reference(row, temperature, top_k, 1.0)
            mass = np.cumsum(np.sort(p / p.sum())[::-1])
            if top_p < 1 and np.abs(mass - top_p).min() < 1e-6:
                continue  # p sits on a cumulative boundary: float32 and float64 may round apart
            keep = nucleus_reference(row, temperature, top_k, top_p)
            np.testing.assert_array_equal(np.isfinite(out), keep, err_msg=f"T={temperature} k={top_k} p={top_p} {row}")
            np.testing.assert_allclose(out[keep], row[keep] / temperature, rtol=1e-6)
            checked += 1
    assert checked > 380, checked  # few rows sit on a boundary
    ties = np.array([3.0, 1.0, 1.0, 1.0, 0.0], np.float32)  # p ≈ (.72, .10, .10, .10, .04): the nucleus of .75
    assert np.isfinite(np.asarray(filter_logits(jnp.asarray(ties), top_p=0.75))).tolist() == [True] * 4 + [False]


def test_musicgen_top_p_draws_the_truncated_softmax(tiny):
    """Frame 0 of codebook 0 is the first step's draw: the same logits in every row, so the rows' codes
    are draws from one distribution — the nucleus (mass 0.8) of the softmax at temperature 0.5, with
    top-k ignored (audiocraft: top-p replaces top-k). Unguided, to keep the batch at n rows."""
    task, params, ex = tiny
    n = 3000
    tokens, mask = np.repeat(ex["tokens"][:1], n, 0), np.repeat(ex["mask"][:1], n, 0)
    chroma = np.repeat(ex["chroma"][:1], n, 0)
    out = generate(task.model, params, task.pattern, tokens, mask, 1, jax.random.key(3), chroma=chroma,
                   cfg_scale=None, temperature=0.5, top_k=2, top_p=0.8)
    draws = np.asarray(out.codes)[:, 0, 0]
    logits = np.asarray(teacher_forced_logits(task.model, params, task.pattern.build(ex["codes"][:1], V),
                                              ex["tokens"][:1], ex["mask"][:1], ex["chroma"][:1]))[0, 0, 0]
    z = logits.astype(np.float64) / 0.5
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    keep = nucleus_reference(logits, 0.5, 0, 0.8)
    expected = np.where(keep, p, 0.0) / p[keep].sum()
    assert keep.sum() > 2 and p[~keep].sum() > 0.15  # seen: 5 tokens kept, 17 % of the mass cut
    empirical = np.bincount(draws, minlength=V) / n
    assert empirical[~keep].sum() == 0, "drew a token outside the nucleus"
    # each frequency's standard error is ≤ sqrt(0.25 / n) ≈ 0.009; allow 4 of them (top-k 2 would miss by > 0.08)
    assert np.abs(empirical - expected).max() < 0.036, (empirical[keep], expected[keep])
