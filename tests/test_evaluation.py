"""Evaluation instruments: FAD against its closed form, musicnn's real weights on synthetic music,
attribute checks and the nearest-centroid instrument reader."""
import json

import numpy as np
import pytest

from data_pipeline.synthetic import generate_clip, synthetic_prompts
from melody_jax.evaluation import attributes
from melody_jax.evaluation.fad import embedding_stats, frechet_audio_distance, frechet_distance
from melody_jax.evaluation.generation import read_prompts
from melody_jax.evaluation.musicnn import failure, log_mel_patches, musicnn_features
from melody_jax.training.errors import EvaluationError

SR = 16000


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    var_a, var_b = rng.uniform(0.2, 3.0, 6), rng.uniform(0.2, 3.0, 6)
    expected = np.sum((mu_a - mu_b) ** 2) + np.sum(var_a + var_b - 2 * np.sqrt(var_a * var_b))
    a = embedding_stats(np.zeros((2, 6)))._replace(mean=mu_a, cov=np.diag(var_a))
    b = embedding_stats(np.zeros((2, 6)))._replace(mean=mu_b, cov=np.diag(var_b))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)


def test_fad_of_samples_approaches_the_population_value_and_survives_few_samples():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(20000, 4))
    y = rng.normal(size=(20000, 4)) * 2.0 + 1.0  # N(1, 4 I): FD = 4·1 + 4·(1 + 4 − 2·2) = 8
    assert frechet_audio_distance(x, y) == pytest.approx(8.0, rel=0.03)
    few = frechet_audio_distance(rng.normal(size=(5, 50)), rng.normal(size=(7, 50)))  # N < D: singular Σ
    assert np.isfinite(few) and few > 0
    with pytest.raises(ValueError, match="at least two"):
        frechet_audio_distance(x[:1], y)


def test_musicnn_log_mel_stays_finite_on_loud_tonal_audio():
    loud = np.sin(2 * np.pi * 440 * np.arange(4 * SR) / SR).astype(np.float32)  # full scale
    patches = log_mel_patches(loud)
    assert patches.shape == (1, 187, 96) and np.all(np.isfinite(patches)) and patches.max() > 4.0


@pytest.fixture(scope="module")
def clips():
    leads = [("piano", "piano"), ("strings", "strings"), ("piano", "piano"), ("strings", "strings")]
    return [generate_clip(i, 6.0, 24000, {"lead": lead, "accompaniment": acc, "drums": False, "bass": False})
            for i, (lead, acc) in enumerate(leads)]


@pytest.mark.slow  # musicnn in its own process
def test_musicnn_runs_its_pretrained_tagger(clips):
    feats = musicnn_features([c.audio for c in clips], 24000)
    assert feats.embeddings.shape == (8, 200) and list(feats.clip_of_patch) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert feats.tags.shape == (4, 50) and np.all(np.isfinite(feats.embeddings))
    tag = {name: feats.tags[:, i] for i, name in enumerate(feats.labels)}
    bowed = np.maximum.reduce([tag["strings"], tag["violin"], tag["cello"]])
    # real weights hear the difference: string-section clips score the bowed tags, piano clips the piano tag
    assert min(bowed[1], bowed[3]) > max(bowed[0], bowed[2]), bowed
    assert min(tag["piano"][0], tag["piano"][2]) > max(tag["piano"][1], tag["piano"][3]), tag["piano"]
    # and the clip embeddings separate the two leads: each clip is nearest its own lead's other clip
    emb = feats.clip_embeddings()
    assert attributes.leave_one_out_predictions(emb, [c.attributes["lead"] for c in clips]) == \
        ["piano", "strings", "piano", "strings"]


@pytest.mark.slow  # musicnn in its own process
def test_a_missing_musicnn_checkpoint_is_a_clear_error(clips):
    with pytest.raises(EvaluationError, match="musicnn failed: .*no musicnn checkpoint for 'MSD_musicnn_big'"):
        musicnn_features([clips[0].audio], 24000, model="MSD_musicnn_big")


def test_a_killed_musicnn_process_names_its_signal():
    """An out-of-memory kill ends stderr mid-traceback: the error names the signal, not that last line."""
    cut = "Traceback (most recent call last):\n    logits = tf.compat.v1.layers.dense(inputs=dense_dropout,"
    assert failure(-9, cut) == ("musicnn failed: its process was killed by signal SIGKILL "
                                "(by the system: out of memory?)")
    assert failure(-15, cut) == "musicnn failed: its process was killed by signal SIGTERM"
    assert failure(1, "warning\nValueError: no checkpoint\n\n") == "musicnn failed: ValueError: no checkpoint"
    assert failure(3, "") == "musicnn failed: exit code 3"


def test_attribute_checks_recover_what_synthetic_clips_were_drawn_with(clips):
    hits = attributes.accuracy([c.audio for c in clips], 24000, [c.attributes for c in clips],
                               [c.attributes["lead"] for c in clips])
    assert hits["drums"] == 1.0 and hits["instrument"] == 1.0 and hits["tempo"] >= 0.75, hits
    wrong = [{**c.attributes, "drums": True, "tempo_bpm": c.attributes["tempo_bpm"] * 1.5} for c in clips]
    miss = attributes.accuracy([c.audio for c in clips], 24000, wrong, ["organ"] * 4)
    assert miss["drums"] == 0.0 and miss["instrument"] == 0.0 and miss["tempo"] <= 0.25, miss


def test_named_reads_the_key_the_bpm_and_the_drums_a_prompt_states():
    asked = {"key": "F#", "mode": "minor", "tempo_bpm": 124}
    assert attributes.named("A dark organ piece in F# minor at 124 BPM", asked) == {"key": True, "tempo": True,
                                                                                     "drums": False}
    assert attributes.named("Dark minor-key tune on organ, fast tempo", asked) == {"key": False, "tempo": False,
                                                                                    "drums": True}
    assert attributes.named("around 1240 beats per minute in F# major", asked)["tempo"] is False
    prompts = synthetic_prompts(32, 1234)  # the evaluation's: 16 name their key, 26 their BPM, 26 say if drums play
    names = [attributes.named(t, a) for t, a in prompts]
    assert [sum(n[c] for n in names) for c in ("key", "tempo", "drums")] == [16, 26, 26]
    rows = [{"key": i % 2 == 0, "tempo": True, "drums": i % 4 == 0} for i in range(32)]
    shares = attributes.named_accuracy(rows, [t for t, _ in prompts], [a for _, a in prompts])
    want = {c: np.mean([r[c] for r, n in zip(rows, names) if n[c]]) for c in ("key", "drums")}
    assert shares == {"key": {"accuracy": want["key"], "prompts": 16}, "tempo": {"accuracy": 1.0, "prompts": 26},
                      "drums": {"accuracy": want["drums"], "prompts": 26}}
    assert attributes.named_accuracy(rows[:1], ["calm"], [asked])["key"] == {"accuracy": None, "prompts": 0}


def test_nearest_centroid_on_separated_points():
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal([5, 0, 0], 0.5, (10, 3)), rng.normal([0, 5, 0], 0.5, (10, 3))])
    labels = ["a"] * 10 + ["b"] * 10
    assert attributes.leave_one_out_predictions(x, labels) == labels
    assert attributes.nearest_centroid(x, labels, np.array([[0.1, 3.0, 0.0], [4.0, 0.2, 0.1]])) == ["b", "a"]
    # queries made from the rows (a resynthesis each): row i's query is read by centroids without row i
    swapped = np.concatenate([x[10:], x[:10]])  # every "a" row's query looks like a "b" row, and back
    assert attributes.leave_one_out_predictions(x, labels, swapped) == labels[10:] + labels[:10]
    lone = np.concatenate([x[:10], [[0.0, 0.0, 5.0]]])  # a class of one: without its row, it has no centroid
    assert attributes.leave_one_out_predictions(lone, labels[:10] + ["c"], lone) == labels[:10] + ["a"]


def test_prompt_sources(tmp_path):
    synthetic = read_prompts("synthetic:3:7")
    assert synthetic == [(t, a) for t, a in synthetic_prompts(3, 7)] and all(a["lead"] for _, a in synthetic)
    (tmp_path / "p.txt").write_text("solo piano\n\nfast drums\n")
    assert read_prompts(str(tmp_path / "p.txt")) == [("solo piano", None), ("fast drums", None)]
    (tmp_path / "p.jsonl").write_text('{"text": "calm", "attributes": {"lead": "flute"}}\n{"text": "loud"}\n')
    assert read_prompts(str(tmp_path / "p.jsonl")) == [("calm", {"lead": "flute"}), ("loud", None)]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "calm"}\n')
    with pytest.raises(EvaluationError, match=r"bad.jsonl:1: expected a JSON object with a \"text\" field"):
        read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(EvaluationError, match="synthetic:N"):
        read_prompts("synthetic:many")


def test_launch_evaluate_scores_a_musicgen_bundle(tmp_path):
    """`launch.evaluate` loads either system by its bundle's stages: a tiny untrained MusicGen bundle is
    scored on musicnn against reference clips at its rate, with its own `config.sample`; it has no MuLan,
    so the MuLan measures are n/a."""
    from data_pipeline.builder import PrepareSettings, prepare
    from tests.bundle_fixture import build_musicgen_bundle
    from tests.helpers import run_cli

    bundle = build_musicgen_bundle(str(tmp_path / "stages"))
    data = str(tmp_path / "ref")
    prepare(PrepareSettings(source="synthetic", num_clips=8, clip_seconds=4.0, sample_rate=32000, seed=5), data,
            progress=False)
    out = tmp_path / "eval.json"
    proc = run_cli("launch.evaluate", f"--bundle={bundle}", "--prompts=synthetic:4", f"--reference={data}",
                   "--split=train", "--duration=3", "--batch_size=2", f"--out={out}", timeout=600, devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["system"] == "musicgen" and report["duration_s"] == 3.0
    assert report["sampling"] == {"cfg": 1.5, "top_k": 250, "top_p": 0.0, "temperature": 1.0, "cfg_beta": None,
                                  "two_step_cfg": False}  # tiny's config.sample
    fad = report["fad_musicnn"]
    print("musicnn FAD, untrained MusicGen vs reference halves:", fad)
    assert fad["patches_generated"] == 4 and fad["generated"] > 2 * fad["reference_halves"] > 0, fad
    assert report["fad_mulan"]["generated"] is None and report["mcc"] == {"generated": None, "reference": None}
    assert report["attributes"]["checked_prompts"] == 4
    assert set(report["attributes"]["generated_named"]) == {"key", "tempo", "drums"}
    table = (tmp_path / "eval.md").read_text()
    assert table.startswith("musicgen: 4 prompts × 3 s") and "| MuLan cycle consistency (higher is better) | n/a |" in table
