"""transformers' `HubertModel` checkpoints (and MERT's, HuBERT-shaped) → a frozen ssl stage of our `Hubert`.

The converted stage is an ssl stage with `model.arch = "hubert"`: the kmeans stage fits on it through
`config.upstream.ssl` and `SemanticTokenizer` tokenizes with it, as with our trained Conformer.
Mapping: conv kernels `[out, in, k]` → `[k, in, out]`; the positional conv's weight norm (torch
`dim=2`: one g per kernel tap, the norm over output and input channels) is folded; Linear weights
`[out, in]` become kernels `[in, …]`, split into heads for the attention. Every tensor is taken by
name and shape and the result is checked against the model's own parameter shapes.

MERT (m-a-p/MERT-v1-95M, -330M: `model_type` "mert_model", custom code `MERTModel`) maps field for
field: its `sample_rate` (24 kHz) is read from config.json, `deepnorm` becomes the residual scale
(2·layers)^¼ of its post-LN blocks, and `attention_relax` (subtracting the row maximum of scores
divided by it, then multiplying back) leaves the softmax unchanged, so it is read and ignored.
Refused, one line each: MERT's `feature_extractor_cqt` (CQT bins concatenated to the conv features:
nnAudio's CQT is not ported), the positional conv with batch norm (`conv_pos_batch_norm`), attention
adapters, `feat_proj_layer_norm=false`, activations other than exact GELU.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np

from melody_jax.convert.checkpoint_dir import Checkpoint, ConversionError, check_fits, linear, linear_in, take
from melody_jax.convert.checkpoint_dir import weight_norm

MODEL_TYPES = {"hubert": "HubertModel", "mert_model": "MERTModel"}
TOKEN_RATE = 25  # MeLoDy's semantic tokens a second


@dataclasses.dataclass
class Converted:
    variant: str  # hubert | mert
    config: ml_collections.ConfigDict  # the ssl stage config
    params: dict


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConversionError(message)


def _check(config: dict) -> None:
    kind = config.get("model_type")
    _need(kind in MODEL_TYPES, f"unsupported model_type {kind!r}: expected one of {', '.join(MODEL_TYPES)} "
                               "(a HubertModel or MERT checkpoint directory)")
    _need(config.get("feat_extract_norm", "group") in ("group", "layer"),
          f"unsupported feat_extract_norm {config.get('feat_extract_norm')!r} (only 'group' or 'layer')")
    for field in ("hidden_act", "feat_extract_activation"):
        _need(config.get(field, "gelu") == "gelu", f"unsupported {field} {config.get(field)!r} (only 'gelu')")
    refused = {"feature_extractor_cqt": "MERT's CQT features concatenated to the conv features",
               "conv_pos_batch_norm": "a positional conv with batch norm", "adapter_attn_dim": "attention adapters"}
    for field, what in refused.items():
        _need(not config.get(field), f"unsupported {field}={config.get(field)!r} ({what})")
    _need(config.get("feat_proj_layer_norm", True), "unsupported feat_proj_layer_norm=false")
    _need(not (config.get("deepnorm") and config.get("do_stable_layer_norm")),
          "unsupported deepnorm with do_stable_layer_norm (MERT refuses it too)")
    _need(config["hidden_size"] % config["num_attention_heads"] == 0,
          f"hidden_size {config['hidden_size']} does not split into {config['num_attention_heads']} heads")
    _need(len(config["conv_dim"]) == len(config["conv_kernel"]) == len(config["conv_stride"]),
          "conv_dim, conv_kernel and conv_stride differ in length")


def _preprocessor(path: str) -> dict:
    """preprocessor_config.json (the feature extractor: sampling_rate, do_normalize) when present."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file) as f:
            return dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise ConversionError(f"{file} is not readable JSON: {e}") from None


def _prefix(tensors: dict) -> str:
    """'' for HubertModel's keys, 'hubert.' for a task model's (HubertForCTC, …)."""
    ends = [k for k in tensors if k.endswith("feature_projection.projection.weight")]
    _need(len(ends) == 1, "no single feature_projection.projection.weight tensor: not a HuBERT checkpoint")
    return ends[0][: -len("feature_projection.projection.weight")]


def _norm(t: dict, name: str, d: int) -> dict:
    return {"scale": take(t, f"{name}.weight", (d,)), "bias": take(t, f"{name}.bias", (d,))}


def _dense(t: dict, name: str, d_in: int, d_out: int) -> dict:
    return {"kernel": linear(t, f"{name}.weight", d_in, (d_out,)), "bias": take(t, f"{name}.bias", (d_out,))}


def hubert_params(config: dict, t: dict, p: str) -> dict:
    channels, kernels = config["conv_dim"], config["conv_kernel"]
    d, heads, mlp = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    hd = d // heads
    layer_mode = config.get("feat_extract_norm", "group") == "layer"
    fe, c_in = {}, 1
    for i, (c, k) in enumerate(zip(channels, kernels)):
        name = f"{p}feature_extractor.conv_layers.{i}"
        fe[f"conv_{i}"] = take(t, f"{name}.conv.weight", (c, c_in, k)).transpose(2, 1, 0)
        if config.get("conv_bias", False):
            fe[f"bias_{i}"] = take(t, f"{name}.conv.bias", (c,))
        if layer_mode:
            fe[f"norm_{i}"] = _norm(t, f"{name}.layer_norm", c)
        elif i == 0:
            fe["group_norm_scale"] = take(t, f"{name}.layer_norm.weight", (c,))
            fe["group_norm_bias"] = take(t, f"{name}.layer_norm.bias", (c,))
        c_in = c
    k, groups = config["num_conv_pos_embeddings"], config["num_conv_pos_embedding_groups"]
    pos = f"{p}encoder.pos_conv_embed.conv"
    out = {"feature_encoder": fe, "feature_norm_layer": _norm(t, f"{p}feature_projection.layer_norm", c_in),
           "feature_proj": _dense(t, f"{p}feature_projection.projection", c_in, d),
           "pos_conv": {"kernel": weight_norm(t, pos, (d, d // groups, k), dim=2).transpose(2, 1, 0),
                        "bias": take(t, f"{pos}.bias", (d,))},
           "encoder_norm": _norm(t, f"{p}encoder.layer_norm", d)}
    for i in range(config["num_hidden_layers"]):
        b = f"{p}encoder.layers.{i}."
        attn = {n: {"kernel": linear(t, f"{b}attention.{n[0]}_proj.weight", d, (heads, hd)),
                    "bias": take(t, f"{b}attention.{n[0]}_proj.bias", (d,)).reshape(heads, hd)}
                for n in ("query", "key", "value")}
        attn["out"] = {"kernel": linear_in(t, f"{b}attention.out_proj.weight", (heads, hd), d),
                       "bias": take(t, f"{b}attention.out_proj.bias", (d,))}
        out[f"blocks_{i}"] = {"attn": attn, "attn_norm": _norm(t, f"{b}layer_norm", d),
                              "mlp_norm": _norm(t, f"{b}final_layer_norm", d),
                              "fc1": _dense(t, f"{b}feed_forward.intermediate_dense", d, mlp),
                              "fc2": _dense(t, f"{b}feed_forward.output_dense", mlp, d)}
    return out


def ssl_config(config: dict, preprocessor: dict, sample_rate: int) -> ml_collections.ConfigDict:
    """Our ssl stage config for a HuBERT/MERT config; the tokenizer takes `sample_rate` audio."""
    from configs.ssl import get_config

    model_rate = int(config.get("sample_rate") or preprocessor.get("sampling_rate") or 16000)
    _need(sample_rate % TOKEN_RATE == 0, f"--sample_rate={sample_rate} is not a whole number of samples per "
                                         f"{TOKEN_RATE}-Hz token")
    layers = int(config["num_hidden_layers"])
    c = get_config("base")
    c.model = ml_collections.ConfigDict({
        "arch": "hubert", "conv_channels": list(config["conv_dim"]), "conv_kernels": list(config["conv_kernel"]),
        "conv_strides": list(config["conv_stride"]), "conv_bias": bool(config.get("conv_bias", False)),
        "feature_norm": config.get("feat_extract_norm", "group"), "embed_dim": int(config["hidden_size"]),
        "num_layers": layers, "num_heads": int(config["num_attention_heads"]),
        "mlp_dim": int(config["intermediate_size"]), "pos_kernel": int(config["num_conv_pos_embeddings"]),
        "pos_groups": int(config["num_conv_pos_embedding_groups"]),
        "stable_layer_norm": bool(config.get("do_stable_layer_norm", False)),
        "residual_scale": float((2.0 * layers) ** 0.25 if config.get("deepnorm") else 1.0),
        "layer_norm_eps": float(config.get("layer_norm_eps", 1e-5)),
        "normalize_audio": bool(preprocessor.get("do_normalize", False)), "model_rate": model_rate,
        "token_hop": sample_rate // TOKEN_RATE, "dtype": "float32"})
    c.data.sample_rate = sample_rate
    c.hf = ml_collections.ConfigDict({"variant": variant_name(config), "model_type": config["model_type"]})
    return c


def variant_name(config: dict) -> str:
    return "mert" if config["model_type"] == "mert_model" else "hubert"


def hubert_from_hf(ckpt: Checkpoint, sample_rate: int = 24000) -> Converted:
    """The checkpoint as our ssl stage (config + parameters) whose tokenizer takes `sample_rate` audio."""
    from flax import linen as nn

    from melody_jax.frozen.stage_models import build_model

    try:
        _check(ckpt.config)
        config = ssl_config(ckpt.config, _preprocessor(ckpt.path), sample_rate)
        params = hubert_params(ckpt.config, ckpt.tensors, _prefix(ckpt.tensors))
    except (KeyError, TypeError) as e:  # a config.json field missing or of the wrong kind
        raise ConversionError(f"{ckpt.path}/config.json: missing or malformed field {e}") from None
    check_fits(params, nn.meta.unbox(jax.eval_shape(build_model(config).init, jax.random.key(0))), "ssl")
    return Converted(variant_name(ckpt.config), config, jax.tree.map(np.asarray, params))
