"""EnCodec 32 kHz converted from transformers (tests/fixtures/hf/encodec_32khz*, made by
benchmarks/peers/fixtures_encodec.py): identical codes, decoded audio within 1e-4, and the refusals."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from melody_jax.convert.checkpoint_dir import ConversionError, read_checkpoint
from melody_jax.convert.hf_encodec import encodec_from_hf
from melody_jax.models import codec
from melody_jax.nn.conv import Conv, Upsample

pytestmark = pytest.mark.slow  # every EnCodec variant converted and compared

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _converted(variant):
    ckpt = read_checkpoint(os.path.join(FIXTURES, variant))
    model_config, variables = encodec_from_hf(ckpt.config, ckpt.tensors)
    golden = dict(np.load(os.path.join(FIXTURES, variant, "golden.npz"), allow_pickle=False))
    return codec.build(model_config), variables, golden


def _encode_decode(model, variables, audio, codes):
    with jax.default_matmul_precision("highest"):
        ours_codes = jax.jit(lambda v, a: codec.encode(v, a, model))(variables, audio)
        decoded = jax.jit(lambda v, c: codec.decode(v, c, model))(variables, codes)
    return np.asarray(ours_codes), np.asarray(decoded)


# float32 with parametrization names, no shortcuts, 4 × 2048 codes; bfloat16 with weight_g/weight_v
# names, conv shortcuts and the EMA statistics, 4 × 256 codes
@pytest.mark.parametrize("variant", ["encodec_32khz", "encodec_32khz_legacy"])
def test_converted_encodec_matches_transformers(variant):
    model, variables, golden = _converted(variant)
    assert model.encoder.options == dataclasses.replace(codec.ENCODEC, conv_shortcut=variant.endswith("legacy"))
    assert variables["vq_stats"]["quantizer"]["levels_0"]["codebook"].shape[0] == (256 if "legacy" in variant else 2048)
    with jax.default_matmul_precision("highest"):
        latent = jax.jit(lambda v, a: model.apply(v, a, method=lambda m, x: m.encoder(x)))(variables, golden["audio"])
    np.testing.assert_allclose(np.swapaxes(latent, 1, 2), golden["latent"], atol=1e-5)  # seen 1.3e-7
    for prefix in ("", "short_"):  # 7 frames from a length off the hop; one frame from 500 samples
        codes, decoded = _encode_decode(model, variables, golden[f"{prefix}audio"], golden[f"{prefix}codes"])
        np.testing.assert_array_equal(codes, golden[f"{prefix}codes"])
        assert decoded.shape == golden[f"{prefix}decoded"].shape
        np.testing.assert_allclose(decoded, golden[f"{prefix}decoded"], atol=1e-4)  # seen 3.6e-7 (peak ~1)


def test_each_encodec_option_changes_the_output():
    """The fixture exercises every option: today's codec layout with the same weights decodes differently."""
    model, variables, golden = _converted("encodec_32khz")
    for change in (dict(split="left"), dict(pad_mode="zeros")):
        options = dataclasses.replace(model.encoder.options, **change)
        other = codec.Codec(dataclasses.replace(model.encoder, options=options),
                            dataclasses.replace(model.decoder, options=options), model.quantizer)
        _, decoded = _encode_decode(other, variables, golden["audio"][:, :4480], golden["codes"])
        assert np.abs(decoded - golden["decoded"]).max() > 1e-3, change


@pytest.mark.parametrize("split", ["left", "right"])
def test_upsample_split_equals_a_trimmed_transposed_conv(split):
    """Polyphase upsampling = a zero-stuffed conv whose padding trims ⌊(k − rate)/2⌋ on the named side."""
    kernel, rate = 10, 5
    x = jax.random.normal(jax.random.key(0), (2, 9, 3))
    up = Upsample(4, kernel, rate, split)
    variables = up.init(jax.random.key(1), x)
    trim_left = (kernel - rate) // 2 if split == "left" else kernel - rate - (kernel - rate) // 2
    lo = kernel - 1 - trim_left
    reference = Conv(4, (kernel,), (1,), ((lo, kernel + rate - 2 - lo),), lhs_dilation=(rate,))
    np.testing.assert_allclose(up.apply(variables, x), reference.apply(variables, x), atol=1e-5)


def _refusal(config, tensors):
    with pytest.raises(ConversionError) as e:
        encodec_from_hf(config, tensors)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_converter_refusals_name_the_problem():
    ckpt = read_checkpoint(os.path.join(FIXTURES, "encodec_32khz"))
    config, tensors = ckpt.config, ckpt.tensors
    assert _refusal({**config, "use_causal_conv": True}, tensors) == (
        "unsupported EnCodec variant: use_causal_conv=True (supported: False, as facebook/encodec_32khz)")
    assert _refusal({**config, "model_type": "dac"}, tensors) == "audio encoder model_type is 'dac', expected 'encodec'"
    missing = {k: v for k, v in tensors.items() if k != "decoder.layers.1.lstm.weight_hh_l1"}
    assert _refusal(config, missing) == "missing tensor 'decoder.layers.1.lstm.weight_hh_l1'"
    name = "encoder.layers.6.conv.parametrizations.weight.original1"
    wrong = {**tensors, name: tensors[name][:, :, :5]}
    assert _refusal(config, wrong) == f"tensor '{name}' has shape (8, 4, 5), expected (8, 4, 8)"
    fewer = {**config, "target_bandwidths": [1.1]}  # 2 codebooks' worth: the file has 4
    assert _refusal(fewer, tensors) == "the checkpoint has more than the 2 codebooks its target_bandwidths use"


def test_converted_variables_carry_logical_axes_like_a_fresh_codec():
    """The converted tree has exactly the parameters (and shapes) of a freshly initialised codec."""
    model, variables, _ = _converted("encodec_32khz_legacy")
    fresh = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1280)))
    lstm = fresh["params"]["encoder"]["lstm"]["recurrent_kernel_0"]
    assert lstm.names == ("embed", "mlp")
    shapes = lambda tree: jax.tree.map(lambda x: tuple(np.shape(x)), tree)  # noqa: E731
    assert shapes(nn.meta.unbox(fresh)) == shapes(variables)
