"""transformers' MusicGen checkpoints (musicgen-*, -melody, -stereo-*) → our MusicGen stage + codec stage.

`musicgen_from_hf` maps a `Checkpoint` (`melody_jax.convert.checkpoint_dir`) onto the MusicGen LM
with the architecture options of `melody_jax.models.musicgen_lm` (LayerNorm, sinusoidal positions,
no FFN biases, a T5 text encoder with `enc_to_dec_proj`, musicgen-melody's "prepend" mode, stereo as
8 interleaved codebooks with delays 0, 0, 1, 1, …) and the audio encoder onto our codec
(`melody_jax.convert.hf_encodec`). torch Linear weights `[out, in]` become kernels `[in, …]`, split
into heads where our layout has them. Every tensor is taken by name and shape (`take`), and the
result is checked against the model's own parameter shapes, so a file that does not fit gets one
line naming the first tensor that does not.

Sampling defaults stored with the converted model are the hub's generation config (sampling,
guidance 3, 1500 tokens = 30 s) except top-k: 250 as audiocraft (transformers' default is 50).
"""
from __future__ import annotations

import dataclasses
import math
import os

import jax
import ml_collections
import numpy as np

from melody_jax.convert.checkpoint_dir import Checkpoint, ConversionError, check_fits, linear, linear_in, take
from melody_jax.convert.hf_encodec import encodec_from_hf
from melody_jax.training.layer_layout import relayout

VARIANTS = {"musicgen": "MusicgenForConditionalGeneration", "musicgen_melody": "MusicgenMelodyForConditionalGeneration"}
TOKENIZER_FILE = "tokenizer.json"
HUB_SAMPLING = dict(top_k=250, top_p=0.0, temperature=1.0, cfg_scale=3.0, duration=30.0)


@dataclasses.dataclass
class Converted:
    """The two stages of a MusicGen bundle: configs (full stage configs) and parameter trees."""

    variant: str  # musicgen | musicgen-melody | musicgen-stereo (| musicgen-stereo-melody)
    musicgen_config: ml_collections.ConfigDict
    musicgen_params: dict
    codec_config: ml_collections.ConfigDict
    codec_params: dict
    tokenizer: str  # path of tokenizer.json


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)


def _check(config: dict) -> tuple[dict, dict]:
    """(text encoder config, decoder config), refusing what our model cannot compute."""
    kind = config.get("model_type")
    _need(kind in VARIANTS, f"unsupported model_type {kind!r}: expected one of {', '.join(VARIANTS)} "
                            "(a MusicGen checkpoint directory such as facebook/musicgen-small)")
    for part in ("text_encoder", "audio_encoder", "decoder"):
        _need(isinstance(config.get(part), dict), f"config.json has no {part} section; is this a {kind} checkpoint?")
    text, dec = config["text_encoder"], config["decoder"]
    _need(text.get("model_type") == "t5", f"unsupported text encoder {text.get('model_type')!r} (only T5)")
    _need(text.get("feed_forward_proj", "relu") == "relu",
          f"unsupported T5 feed_forward_proj {text.get('feed_forward_proj')!r} (only 'relu', as t5-base)")
    _need(dec.get("activation_function", "gelu") == "gelu",
          f"unsupported decoder activation {dec.get('activation_function')!r} (only 'gelu')")
    _need(not dec.get("scale_embedding", False), "unsupported decoder option scale_embedding=true")
    _need(dec.get("audio_channels", 1) in (1, 2), f"unsupported audio_channels {dec.get('audio_channels')}")
    _need(dec.get("cross_attention_hidden_size") is None, "unsupported decoder option cross_attention_hidden_size")
    _need(dec["num_codebooks"] % dec.get("audio_channels", 1) == 0,
          f"{dec['num_codebooks']} codebooks do not split into {dec['audio_channels']} channels")
    return text, dec


def variant_name(config: dict) -> str:
    name = "musicgen-melody" if config["model_type"] == "musicgen_melody" else "musicgen"
    return name.replace("musicgen", "musicgen-stereo", 1) if config["decoder"].get("audio_channels", 1) == 2 else name


def t5_params(tensors: dict, text: dict, prefix: str = "text_encoder.") -> dict:
    d, heads, d_kv, d_ff = text["d_model"], text["num_heads"], text["d_kv"], text["d_ff"]
    vocab = text["vocab_size"]
    table = prefix + "shared.weight"
    if table not in tensors:  # tied: either name may be the one saved
        table = prefix + "encoder.embed_tokens.weight"
    out = {"token_embedding": take(tensors, table, (vocab, d)),
           "relative_bias": take(tensors, f"{prefix}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                                 (text.get("relative_attention_num_buckets", 32), heads)),
           "final_norm": {"scale": take(tensors, f"{prefix}encoder.final_layer_norm.weight", (d,))}}
    for i in range(text["num_layers"]):
        b = f"{prefix}encoder.block.{i}.layer."
        attn = {n: {"kernel": linear(tensors, f"{b}0.SelfAttention.{t}.weight", d, (heads, d_kv))}
                for n, t in (("query", "q"), ("key", "k"), ("value", "v"))}
        out[f"layers_{i}"] = {
            **attn, "out": {"kernel": linear_in(tensors, f"{b}0.SelfAttention.o.weight", (heads, d_kv), d)},
            "attn_norm": {"scale": take(tensors, f"{b}0.layer_norm.weight", (d,))},
            "mlp_norm": {"scale": take(tensors, f"{b}1.layer_norm.weight", (d,))},
            "wi": {"kernel": linear(tensors, f"{b}1.DenseReluDense.wi.weight", d, (d_ff,))},
            "wo": {"kernel": linear(tensors, f"{b}1.DenseReluDense.wo.weight", d_ff, (d,))}}
    return out


def _norm(tensors: dict, name: str, d: int) -> dict:
    return {"scale": take(tensors, f"{name}.weight", (d,)), "bias": take(tensors, f"{name}.bias", (d,))}


def _attention(tensors: dict, name: str, d: int, heads: int) -> dict:
    hd = d // heads
    out = {n: {"kernel": linear(tensors, f"{name}.{n[0]}_proj.weight", d, (heads, hd))}
           for n in ("query", "key", "value")}
    out["out"] = {"kernel": linear_in(tensors, f"{name}.out_proj.weight", (heads, hd), d)}
    return out


def decoder_params(tensors: dict, dec: dict, cross: bool, prefix: str = "decoder.") -> dict:
    d, heads, k, v = dec["hidden_size"], dec["num_attention_heads"], dec["num_codebooks"], dec["vocab_size"]
    base = f"{prefix}model.decoder."
    out = {"embedding": np.stack([take(tensors, f"{base}embed_tokens.{i}.weight", (v + 1, d)) for i in range(k)]),
           "final_norm": _norm(tensors, f"{base}layer_norm", d),
           "head": {"kernel": np.stack([take(tensors, f"{prefix}lm_heads.{i}.weight", (v, d)).T for i in range(k)],
                                       axis=1)}}
    for i in range(dec["num_hidden_layers"]):
        layer = f"{base}layers.{i}."
        block = {"attn_norm": _norm(tensors, layer + "self_attn_layer_norm", d),
                 "self_attn": _attention(tensors, layer + "self_attn", d, heads),
                 "mlp_norm": _norm(tensors, layer + "final_layer_norm", d),
                 "mlp": {"fc1": {"kernel": linear(tensors, layer + "fc1.weight", d, (dec["ffn_dim"],))},
                         "fc2": {"kernel": linear(tensors, layer + "fc2.weight", dec["ffn_dim"], (d,))}}}
        if cross:
            block["cross_norm"] = _norm(tensors, layer + "encoder_attn_layer_norm", d)
            block["cross_attn"] = _attention(tensors, layer + "encoder_attn", d, heads)
        out[f"layers_{i}"] = block
    return out


def musicgen_config(config: dict, codec_model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Our musicgen stage config for a transformers MusicGen config (+ the codec it runs with)."""
    from configs.musicgen import get_config

    text, dec = config["text_encoder"], config["decoder"]
    melody = config["model_type"] == "musicgen_melody"
    channels = dec.get("audio_channels", 1)
    c = get_config("small")
    m = c.model
    m.num_codebooks, m.codebook_size = dec["num_codebooks"], dec["vocab_size"]
    m.pattern, m.delays = "delay", [k // channels for k in range(dec["num_codebooks"])]
    m.num_layers, m.embed_dim, m.num_heads, m.mlp_dim = (dec["num_hidden_layers"], dec["hidden_size"],
                                                          dec["num_attention_heads"], dec["ffn_dim"])
    m.text_layers, m.text_embed_dim, m.text_heads, m.text_mlp_dim = (text["num_layers"], text["d_model"],
                                                                      text["num_heads"], text["d_ff"])
    m.text_vocab_size, m.text_head_dim = text["vocab_size"], text["d_kv"]
    m.max_text_length = 512
    m.use_melody = melody
    m.melody_mode = "prepend" if melody else "prefix"
    m.melody_frames = int(config.get("chroma_length", 235)) if melody else 1
    m.chroma_hop_frames = 1
    m.dtype, m.remat = "float32", False
    m.norm, m.positions, m.mlp_bias, m.text_encoder = "layer", "sinusoidal", False, "t5"
    m.text_proj = text["d_model"] != dec["hidden_size"]
    sample_rate = int(config["audio_encoder"]["sampling_rate"])
    c.data.sample_rate = sample_rate
    hop = math.prod(codec_model.strides)
    _need(sample_rate % hop == 0, f"the audio encoder's hop {hop} does not divide its {sample_rate} Hz")
    c.data.frame_rate = sample_rate // hop
    c.data.frames = 1500
    c.sample.update(HUB_SAMPLING)
    c.sample.window_frames = 1500
    c.sample.keep_frames = 750 if melody else 600  # audiocraft: extend_stride 18 s of 30 (melody: 15 s)
    c.hf = ml_collections.ConfigDict({"variant": variant_name(config), "model_type": config["model_type"],
                                      "audio_channels": channels})
    return c


def codec_config(model: ml_collections.ConfigDict, sample_rate: int) -> ml_collections.ConfigDict:
    from configs.codec import get_config

    c = get_config("small")
    c.model = model
    c.data.sample_rate = sample_rate
    return c


def musicgen_from_hf(ckpt: Checkpoint, scan_layers: bool = False) -> Converted:
    """The checkpoint's LM (+ T5 + projections) and codec, as our stage configs and parameter trees;
    `scan_layers`: the decoder's and T5's blocks stacked for `model.scan_layers`."""
    try:
        return _convert(ckpt, scan_layers)
    except (KeyError, TypeError) as e:  # a config.json field missing or of the wrong kind
        raise ConversionError(f"{ckpt.path}/config.json: missing or malformed field {e}") from None


def _convert(ckpt: Checkpoint, scan_layers: bool) -> Converted:
    from flax import linen as nn

    from melody_jax.tasks.musicgen import MusicGenTask

    text, dec = _check(ckpt.config)
    tokenizer = os.path.join(ckpt.path, TOKENIZER_FILE)
    _need(os.path.exists(tokenizer), f"{ckpt.path} has no {TOKENIZER_FILE} (the T5 tokenizer that ships with the "
                                     "checkpoint; spiece.model alone is not read)")
    melody = ckpt.config["model_type"] == "musicgen_melody"
    t = ckpt.tensors
    params = {"text_encoder": t5_params(t, text), **decoder_params(t, dec, cross=not melody)}
    if text["d_model"] != dec["hidden_size"]:
        params["text_projection"] = {"kernel": linear(t, "enc_to_dec_proj.weight", text["d_model"], (dec["hidden_size"],)),
                                     "bias": take(t, "enc_to_dec_proj.bias", (dec["hidden_size"],))}
    if melody:
        chroma = int(ckpt.config.get("num_chroma", 12))
        _need(chroma == 12, f"unsupported num_chroma {chroma} (only 12)")
        params["melody_proj"] = {"kernel": linear(t, "audio_enc_to_dec_proj.weight", chroma, (dec["hidden_size"],)),
                                 "bias": take(t, "audio_enc_to_dec_proj.bias", (dec["hidden_size"],))}
    codec_model, codec_variables = encodec_from_hf(ckpt.config["audio_encoder"], t, prefix="audio_encoder.")
    _need(codec_model.quantizer.num_quantizers == dec["num_codebooks"] // dec.get("audio_channels", 1),
          f"the audio encoder has {codec_model.quantizer.num_quantizers} codebooks, the decoder models "
          f"{dec['num_codebooks']} for {dec.get('audio_channels', 1)} channel(s)")
    _need(codec_model.quantizer.codebook_size == dec["vocab_size"],
          f"the audio encoder's codebooks have {codec_model.quantizer.codebook_size} codes, the decoder "
          f"{dec['vocab_size']}")
    config = musicgen_config(ckpt.config, codec_model)
    config.model.scan_layers = scan_layers
    task = MusicGenTask(config)
    task.validate()
    shapes = nn.meta.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
    if scan_layers:
        params = relayout(params, shapes)
    check_fits(params, shapes, "musicgen")
    codec_params = {"generator": codec_variables["params"],
                    "generator_state": {k: v for k, v in codec_variables.items() if k != "params"}}
    return Converted(variant_name(ckpt.config), config, params,
                     codec_config(codec_model, int(ckpt.config["audio_encoder"]["sampling_rate"])), codec_params,
                     tokenizer)
