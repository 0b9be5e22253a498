"""`launch.demo` stops at a stage that did not finish (a SIGTERM or Ctrl-C preempts the training loop,
which saves and returns): the next stage must not start on a half-trained upstream. Its recipes scale the
stages' steps, and a workdir resumes only with the recipe it was started with."""
import json

import pytest

from configs.melody import CACHES, DEMO_STEPS, LONG_CHANGES, RECIPES, STEP_CAPS, demo_configs
from launch import demo
from melody_jax.tasks.registry import get_task
from melody_jax.training.errors import ConfigError, WorkdirError
from tests.helpers import error_line, run_cli, stage_config


def test_a_preempted_stage_stops_the_demo_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr("melody_jax.training.loop.train", lambda task, workdir: {"status": "preempted", "step": 3})
    log = {}
    with pytest.raises(SystemExit) as stop:
        demo.train_stage("kmeans", stage_config("kmeans"), str(tmp_path / "kmeans"), log)
    assert str(stop.value) == (f"[demo] kmeans preempted at step 3 (saved in {tmp_path / 'kmeans'}); "
                               "run the demo again to resume")
    assert log == {}


def test_a_finished_stage_is_logged(tmp_path, monkeypatch):
    monkeypatch.setattr("melody_jax.training.loop.train", lambda task, workdir: {"status": "done", "step": 5})
    log = {}
    demo.train_stage("kmeans", stage_config("kmeans"), str(tmp_path / "kmeans"), log)
    assert log["kmeans"]["status"] == "done" and log["kmeans"]["step"] == 5


def test_a_recipe_scales_the_steps_and_its_workdir_refuses_another(tmp_path):
    root = str(tmp_path / "run")
    recipe = demo.workdir_recipe(root, "2h", 0.5)
    assert (recipe.clips, recipe.caption_clips, recipe.steps_scale, recipe.eval_prompts) == (384, 1536, 4.0, 32)
    configs = demo_configs({"audio": str(tmp_path / "data"), "captions": str(tmp_path / "captions")}, root,
                           recipe.steps_scale)
    assert {s: configs[s].train.num_steps for s in DEMO_STEPS} == {s: 4 * n for s, n in DEMO_STEPS.items()}
    full = demo_configs({"audio": "a", "captions": "c"}, root, 8.0)  # the 2-hour recipe: MuLan stops at its cap
    assert ({s: full[s].train.num_steps for s in DEMO_STEPS}
            == {s: STEP_CAPS.get(s, 8 * n) for s, n in DEMO_STEPS.items()})
    assert full["mulan"].train.num_steps == 6000 < 8 * DEMO_STEPS["mulan"]
    assert full["semantic_lm"].train.num_steps == 12000 < 8 * DEMO_STEPS["semantic_lm"]  # the 4 × 128 LM
    # the 2-hour recipe's own changes: the SSL weighs chroma as onset age, MuLan hears semitone bands and the
    # beat, a wider DPD
    assert recipe.changes is LONG_CHANGES and not RECIPES["demo"].changes
    long = demo_configs({"audio": "a", "captions": "c"}, root, 8.0, recipe.changes)
    get_task(long["ssl"]).validate()
    get_task(long["mulan"]).validate()
    assert list(long["ssl"].model.target_weights) == [1.0, 4.0, 1.0, 4.0]
    assert (long["mulan"].model.frequency_scale, long["mulan"].model.n_mels, long["mulan"].model.fmin,
            long["mulan"].model.tempo_lags, long["mulan"].model.chroma_profile) == ("semitone", 60, 220.0, 128, False)
    assert configs["mulan"].model.frequency_scale == "mel" and full["mulan"].model.n_mels == 64
    assert configs["mulan"].model.tempo_lags == 0 and not configs["mulan"].model.chroma_profile
    # its DPD twice tiny's width, else the demo's; the other stages are the demo's
    get_task(long["dpd"]).validate()
    assert (long["dpd"].model.hidden_dim, long["dpd"].model.mlp_dim, long["dpd"].model.num_heads) == (64, 128, 4)
    assert full["dpd"].model.hidden_dim == 32
    wide, narrow = long["dpd"].to_dict(), full["dpd"].to_dict()
    changed = {k for k in narrow["model"] if wide["model"][k] != narrow["model"][k]}
    assert changed == {"hidden_dim", "mlp_dim", "num_heads"}
    assert {**wide, "model": None} == {**narrow, "model": None}
    assert long["semantic_lm"].to_dict() == full["semantic_lm"].to_dict()
    get_task(configs["ssl"]).validate()  # the demo's HuBERT changes make a config the SSL task accepts
    assert configs["ssl"].model.objective == "hubert"
    # flux: tokens mark onsets; onset_age (4 × the weight): they differ at each place inside a beat
    assert list(configs["ssl"].model.target_features) == ["logmel", "chroma", "flux", "onset_age"]
    assert list(configs["ssl"].model.target_weights) == [1.0, 1.0, 1.0, 4.0]
    assert demo.workdir_recipe(str(tmp_path / "small"), "demo", 1.0).eval_prompts == 32  # the 32 prompts
    get_task(configs["dpd"]).validate()  # and its DPD changes one the DPD task accepts
    assert configs["dpd"].model.continuation_share == 0.5
    assert configs["dpd"].sample.temperature == 0.3  # the bundle's LM sampling, stored with the DPD's config
    # MuLan's text tower: word dropout, and captions three times in four against tag lists
    get_task(configs["mulan"]).validate()
    assert (configs["mulan"].train.word_dropout, configs["mulan"].data.caption_probability) == (0.2, 0.75)
    # the LM trains on 1.92-s crops of a cache of its own (48 tokens), half its rows on caption tokens
    lm = configs["semantic_lm"]
    get_task(lm).validate()
    assert (lm.data.semantic_len, lm.data.text_token_share) == (48, 0.5)
    assert CACHES["semantic_lm"].fields == ("semantic_tokens", "mulan_tokens", "mulan_text_tokens")  # no latents
    assert (lm.model.num_layers, lm.model.embed_dim, lm.model.mlp_dim) == (4, 128, 256)  # copies a beat it is given
    assert lm.data.path.endswith("lm_tokens") and configs["dpd"].data.path.endswith("tokens")
    assert lm.data.path != configs["dpd"].data.path
    # MuLan learns from the captioned dataset, the audio stages from the other
    assert configs["mulan"].data.path.endswith("captions") and configs["vae_gan"].data.path.endswith("data")
    assert configs["ssl"].data.path == configs["vae_gan"].data.path
    assert json.load(open(tmp_path / "run" / "recipe.json")) == {"recipe": "2h", "steps_scale": 0.5}
    assert demo.workdir_recipe(root, "2h", 0.5) == recipe  # resuming with the same recipe
    with pytest.raises(WorkdirError, match="started with --recipe=2h --steps_scale=0.5"):
        demo.workdir_recipe(root, "demo", 0.5)
    with pytest.raises(ConfigError, match="must be positive"):
        demo.workdir_recipe(str(tmp_path / "other"), "demo", 0.0)
    # one error line, exit 2, before any data is prepared
    assert "started with --recipe=2h" in error_line(run_cli("launch.demo", f"--workdir={root}", "--recipe=demo"))
    assert "--recipe" in error_line(run_cli("launch.demo", f"--workdir={root}", "--recipe=5h"))
    assert not (tmp_path / "run" / "data").exists()
