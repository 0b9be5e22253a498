"""`launch.convert --format=hf`: public MusicGen checkpoints → bundles that `MusicGen` and `launch.sample` load,
and one-line refusals of what cannot be converted (fixtures: tests/fixtures/hf, see test_hf_musicgen.py)."""
import json
import os
import shutil

import jax
import numpy as np
import pytest
import soundfile as sf

from launch.convert import convert
from melody_jax.convert.checkpoint_dir import ConversionError
from melody_jax.training.errors import BundleError
from tests.helpers import run_cli

pytestmark = pytest.mark.slow  # converted checkpoints through the CLI

FIXTURES = "tests/fixtures/hf"


@pytest.fixture(scope="module")
def stereo_bundle(tmp_path_factory) -> str:
    """musicgen-stereo (float16, three shards) converted by the CLI."""
    out = str(tmp_path_factory.mktemp("convert") / "stereo")
    proc = run_cli("launch.convert", "--format=hf", f"--input={FIXTURES}/musicgen-stereo", f"--out={out}",
                   devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["variant"] == "musicgen-stereo"
    return out


def test_converted_stereo_bundle_generates_transformers_audio(stereo_bundle):
    """Greedy CFG-3 through `MusicGen`: transformers' codes, and its audio — two channels, each the mono
    codec's decode of the interleaved codebooks [L0, R0, L1, R1, …]."""
    from melody_jax.pipelines.musicgen import MusicGen

    golden = np.load(f"{FIXTURES}/musicgen-stereo/golden.npz", allow_pickle=False)
    with jax.default_matmul_precision("highest"):
        musicgen = MusicGen(stereo_bundle)
        frames = golden["greedy_codes"].shape[2]
        result = musicgen.generate(list(golden["prompts"]), frames / 50, cfg=3.0, temperature=0.0)
    np.testing.assert_array_equal(result.codes, golden["greedy_codes"])
    # …with the text padded to a multiple of 32 tokens (transformers: to the longest, 34): masked, so equal
    assert musicgen.tokenize(list(golden["prompts"]))[0].shape == (2, 64) and golden["input_ids"].shape == (2, 34)
    want = golden["greedy_audio"].transpose(0, 2, 1)  # [B, 2, T] → [B, T, 2]
    assert result.audio.shape == want.shape == (2, frames * 640, 2)
    err = np.abs(result.audio - want).max()
    print(f"stereo audio: max |ours − transformers| = {err:.2e} (peak {np.abs(want).max():.2f})")
    assert err < 1e-4
    # continuation: the stereo prompt is encoded per channel, kept as the first frames, and continued
    prompt = result.audio[:1, :3200]  # 0.1 s = 5 frames
    with jax.default_matmul_precision("highest"):
        cont = musicgen.generate_continuation(prompt, 0.1, ["calm violin"], temperature=0.0)
    assert cont.codes.shape == (1, 8, 10) and cont.audio.shape == (1, 6400, 2)
    np.testing.assert_array_equal(cont.codes[:, :, :5], musicgen.encode(prompt))
    s = musicgen.config.sample  # the hub's generation defaults, top-k as audiocraft
    assert (s.top_k, s.cfg_scale, s.duration, s.window_frames, s.temperature) == (250, 3.0, 30.0, 1500, 1.0)


def test_sample_cli_continues_audio_with_a_converted_bundle(stereo_bundle, tmp_path):
    prompt = str(tmp_path / "prompt.wav")
    sf.write(prompt, 0.3 * np.sin(2 * np.pi * 330 * np.arange(3200) / 32000), 32000)  # 0.1 s = 5 frames
    out = str(tmp_path / "cont.wav")
    proc = run_cli("launch.sample", f"--bundle={stereo_bundle}", f"--continue={prompt}",
                   "--prompt=calm violin", "--duration=0.2", "--top_k=0", "--top_p=0.9", "--seed=1", f"--out={out}",
                   timeout=600, devices=1)
    assert proc.returncode == 0, proc.stderr[-2000:]
    audio, rate = sf.read(out)
    assert rate == 32000 and audio.shape == (3200 + 6400, 2), audio.shape  # the prompt, then 0.2 s more


def _edited_copy(tmp_path, variant: str, edit) -> str:
    """The fixture with its config.json edited by `edit(config)` (weights and tokenizer shared)."""
    out = tmp_path / f"{variant}-edited"
    shutil.copytree(f"{FIXTURES}/{variant}", out)
    with open(out / "config.json") as f:
        config = json.load(f)
    edit(config)
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    return str(out)


@pytest.mark.parametrize("case, message", [
    ("not_a_checkpoint", r"has no config.json \(not a Hugging Face checkpoint directory\)"),
    ("codec_only", r"unsupported model_type 'encodec': expected one of musicgen, musicgen_melody"),
    ("missing_tensor", r"missing tensor 'decoder.model.decoder.layers.2.self_attn_layer_norm.weight'"),
    ("shape_mismatch", r"tensor 'decoder.model.decoder.layers.0.fc1.weight' has shape \(96, 48\), expected \(100, 48\)"),
    ("gated_t5", r"unsupported T5 feed_forward_proj 'gated-gelu' \(only 'relu', as t5-base\)"),
    ("no_tokenizer", r"has no tokenizer.json"),
])
def test_converter_refusals_name_what_is_wrong(tmp_path, case, message):
    sources = {
        "not_a_checkpoint": lambda: str(tmp_path),
        "codec_only": lambda: f"{FIXTURES}/encodec_32khz",
        "missing_tensor": lambda: _edited_copy(tmp_path, "musicgen", lambda c: c["decoder"].update(num_hidden_layers=3)),
        "shape_mismatch": lambda: _edited_copy(tmp_path, "musicgen", lambda c: c["decoder"].update(ffn_dim=100)),
        "gated_t5": lambda: _edited_copy(tmp_path, "musicgen",
                                         lambda c: c["text_encoder"].update(feed_forward_proj="gated-gelu")),
    }
    if case == "no_tokenizer":
        source = _edited_copy(tmp_path, "musicgen-melody", lambda c: None)
        os.remove(os.path.join(source, "tokenizer.json"))
    else:
        source = sources[case]()
    with pytest.raises(ConversionError, match=message) as info:
        convert(source, str(tmp_path / "bundle"))
    assert "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "bundle" / "bundle.json")


def test_convert_cli_refuses_with_one_line_and_exit_2(stereo_bundle, tmp_path):
    proc = run_cli("launch.convert", "--format=hf", f"--input={tmp_path / 'nowhere'}", f"--out={tmp_path / 'b'}",
                   devices=1)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "is not a directory" in proc.stderr
    with pytest.raises(BundleError, match="already holds a bundle"):
        convert(f"{FIXTURES}/musicgen", stereo_bundle)


def test_bfloat16_bundle_generates_close_to_float32(tmp_path):
    """--dtype=bfloat16 is outside the parity claim: it generates, and its greedy codes mostly agree."""
    from melody_jax.pipelines.musicgen import MusicGen

    convert(f"{FIXTURES}/musicgen", str(tmp_path / "bf16"), "bfloat16")
    golden = np.load(f"{FIXTURES}/musicgen/golden.npz", allow_pickle=False)
    musicgen = MusicGen(str(tmp_path / "bf16"))
    assert musicgen.model.dtype == np.dtype("bfloat16")
    result = musicgen.generate(list(golden["prompts"]), golden["greedy_codes"].shape[2] / 50, cfg=3.0,
                               temperature=0.0)
    agree = (result.codes == golden["greedy_codes"]).mean()
    print(f"bfloat16 greedy codes agreeing with transformers' float32: {agree:.3f}")  # seen: 0.981
    assert agree > 0.9 and np.isfinite(result.audio).all()


def test_melody_bundle_follows_the_given_melody(tmp_path):
    """generate_with_chroma on a converted musicgen-melody: the tune's chroma (hub_chroma) reaches the model."""
    from melody_jax.pipelines.generation import AudioInputError
    from melody_jax.pipelines.musicgen import MusicGen

    convert(f"{FIXTURES}/musicgen-melody", str(tmp_path / "melody"))
    musicgen = MusicGen(str(tmp_path / "melody"))
    t = np.arange(16000) / 32000
    tone = lambda hz: (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)  # noqa: E731
    a = musicgen.generate_with_chroma(["calm violin"], tone(440.0), 0.3, temperature=0.0)
    b = musicgen.generate_with_chroma(["calm violin"], tone(261.6), 0.3, temperature=0.0)
    null = musicgen.generate(["calm violin"], 0.3, temperature=0.0)
    assert a.codes.shape == (1, 4, 15) and a.audio.shape == (1, 9600)
    assert (a.codes != b.codes).any() and (a.codes != null.codes).any()
    with pytest.raises(AudioInputError, match="at least one codec frame"):
        musicgen.generate_with_chroma(["x"], np.zeros(10, np.float32), 0.3)


def test_configs_written_before_the_architecture_options_build_the_same_model():
    """A MusicGen stage trained before these options (config.json without them) loads as before."""
    from flax import linen as nn

    from melody_jax.tasks.musicgen import ARCHITECTURE, MusicGenTask
    from tests.helpers import stage_config

    config = stage_config("musicgen")
    old = stage_config("musicgen")
    for field in ARCHITECTURE:
        del old.model[field]
    MusicGenTask(old).validate()
    shapes = [jax.tree.map(lambda x: (x.value.shape, x.names), jax.eval_shape(MusicGenTask(c).init_params,
                                                                             jax.random.key(0)),
                           is_leaf=lambda x: isinstance(x, nn.Partitioned)) for c in (config, old)]
    assert shapes[0] == shapes[1] and "scale" in shapes[0]["final_norm"] and "bias" in shapes[0]["layers_0"]["mlp"]["fc1"]
