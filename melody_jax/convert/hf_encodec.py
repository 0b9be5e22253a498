"""transformers' `EncodecModel` (facebook/encodec_32khz, MusicGen's `audio_encoder`) → our codec.

Maps the Hugging Face layer list onto melody_jax/models/codec.py with its EnCodec options
(`SEANetOptions`: LSTM, reflect padding, right-half split, conv shortcuts when the keys have them)
and returns the model config and variables the codec stage stores. On the way:
- weight norm is folded, w = g · v / ‖v‖ with the norm over all axes but the first: per output
  channel for a conv (`[out, in, k]`), per input channel for a transposed conv (`[in, out, k]`);
  both torch namings are read (`parametrizations.weight.original0/1` and the older `weight_g/_v`);
- conv kernels `[out, in, k]` become `[k, in, out]`; transposed-conv kernels `[in, out, k]` become
  `[k, in, out]` reversed along k (our polyphase upsampler correlates, see nn/conv.py `Upsample`);
- each LSTM layer's two biases are summed, its `[4H, H]` weights transposed (gate order kept);
- codebooks `embed [K, D]` go to `vq_stats` with the EMA statistics (`cluster_size`, `embed_avg`)
  when the file has them, else fresh ones (`VectorQuantizer.set_codebook`'s).
"""
from __future__ import annotations

import math

import ml_collections
import numpy as np

from melody_jax.convert.checkpoint_dir import ConversionError, take, weight_norm

_FRESH_CLUSTER_SIZE = 2.0  # VectorQuantizer._fresh_size at the default dead_code_threshold
_REQUIRED = {"audio_channels": 1, "use_causal_conv": False, "norm_type": "weight_norm", "num_residual_layers": 1,
             "compress": 2, "kernel_size": 7, "last_kernel_size": 7, "residual_kernel_size": 3,
             "normalize": False, "chunk_length_s": None}


def _check(config: dict) -> None:
    """Refuses what our codec cannot compute (EnCodec 24/48 kHz: causal, normalized, chunked, stereo)."""
    if config.get("model_type") != "encodec":
        raise ConversionError(f"audio encoder model_type is {config.get('model_type')!r}, expected 'encodec'")
    for key, want in _REQUIRED.items():
        if config.get(key, want) != want:
            raise ConversionError(f"unsupported EnCodec variant: {key}={config.get(key)!r} (supported: {want!r}, "
                                  "as facebook/encodec_32khz)")
    if config.get("pad_mode", "reflect") not in ("reflect", "constant"):
        raise ConversionError(f"unsupported EnCodec pad_mode {config.get('pad_mode')!r}")
    if config.get("codebook_dim") not in (None, config["hidden_size"]):
        raise ConversionError(f"unsupported EnCodec codebook_dim {config['codebook_dim']} != hidden_size "
                              f"{config['hidden_size']}")


def num_quantizers(config: dict) -> int:
    """EncodecConfig.num_quantizers: the codebooks the largest target bandwidth uses."""
    hop = math.prod(config["upsampling_ratios"])
    frame_rate = math.ceil(config["sampling_rate"] / hop)
    bits = int(math.log2(config["codebook_size"]))
    return int(1000 * config["target_bandwidths"][-1] // (frame_rate * bits))


class _Reader:
    """Reads one prefix's tensors, folding weight norm; remembers nothing but the tensors."""

    def __init__(self, tensors: dict, prefix: str):
        self.tensors, self.prefix = tensors, prefix

    def has(self, name: str) -> bool:
        return self.prefix + name in self.tensors

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(take(self.tensors, self.prefix + name, shape), np.float32)

    def weight(self, module: str, shape: tuple[int, int, int]) -> np.ndarray:
        """The weight-normed `module.weight` of torch shape `shape`, folded per output row."""
        return weight_norm(self.tensors, self.prefix + module, shape)

    def conv(self, module: str, c_in: int, c_out: int, kernel: int) -> dict:
        w = self.weight(f"{module}.conv", (c_out, c_in, kernel))
        return {"kernel": w.transpose(2, 1, 0), "bias": self.take(f"{module}.conv.bias", (c_out,))}

    def conv_transpose(self, module: str, c_in: int, c_out: int, kernel: int) -> dict:
        w = self.weight(f"{module}.conv", (c_in, c_out, kernel))
        return {"kernel": np.ascontiguousarray(w.transpose(2, 0, 1)[::-1]),
                "bias": self.take(f"{module}.conv.bias", (c_out,))}

    def residual(self, module: str, channels: int, shortcut: bool) -> dict:
        out = {"Conv_0": self.conv(f"{module}.block.1", channels, channels // 2, 3),
               "Conv_1": self.conv(f"{module}.block.3", channels // 2, channels, 1)}
        if shortcut:
            out["shortcut"] = self.conv(f"{module}.shortcut", channels, channels, 1)
        return out

    def lstm(self, module: str, width: int, layers: int) -> dict:
        out = {}
        for i in range(layers):
            shape = (4 * width, width)
            out[f"input_kernel_{i}"] = self.take(f"{module}.lstm.weight_ih_l{i}", shape).T.copy()
            out[f"recurrent_kernel_{i}"] = self.take(f"{module}.lstm.weight_hh_l{i}", shape).T.copy()
            out[f"bias_{i}"] = (self.take(f"{module}.lstm.bias_ih_l{i}", (4 * width,))
                                + self.take(f"{module}.lstm.bias_hh_l{i}", (4 * width,)))
        return out


def encodec_from_hf(config: dict, tensors: dict, prefix: str = "") -> tuple[ml_collections.ConfigDict, dict]:
    """(our codec's model config, its variables `{"params": ..., "vq_stats": ...}`) from an EncodecConfig
    dict and the checkpoint's tensors under `prefix` ("audio_encoder." inside a MusicGen checkpoint)."""
    _check(config)
    r = _Reader(tensors, prefix)
    strides = [int(s) for s in config["upsampling_ratios"]]
    channels, latent = int(config["num_filters"]), int(config["hidden_size"])
    lstm_layers = int(config.get("num_lstm_layers", 2))
    shortcut = r.has("encoder.layers.1.shortcut.conv.bias")
    n = len(strides)

    encoder, width, layer = {"Conv_0": r.conv("encoder.layers.0", 1, channels, 7)}, channels, 1
    for i, s in enumerate(reversed(strides)):
        encoder[f"ResidualUnit_{i}"] = r.residual(f"encoder.layers.{layer}", width, shortcut)
        encoder[f"Conv_{i + 1}"] = r.conv(f"encoder.layers.{layer + 2}", width, 2 * width, 2 * s)
        width, layer = 2 * width, layer + 3
    if lstm_layers:
        encoder["lstm"] = r.lstm(f"encoder.layers.{layer}", width, lstm_layers)
        layer += 1
    encoder[f"Conv_{n + 1}"] = r.conv(f"encoder.layers.{layer + 1}", width, latent, 7)

    decoder, layer = {"Conv_0": r.conv("decoder.layers.0", latent, width, 7)}, 1
    if lstm_layers:
        decoder["lstm"] = r.lstm("decoder.layers.1", width, lstm_layers)
        layer += 1
    for i, s in enumerate(strides):
        decoder[f"Upsample_{i}"] = r.conv_transpose(f"decoder.layers.{layer + 1}", width, width // 2, 2 * s)
        width //= 2
        decoder[f"ResidualUnit_{i}"] = r.residual(f"decoder.layers.{layer + 2}", width, shortcut)
        layer += 3
    decoder["Conv_1"] = r.conv(f"decoder.layers.{layer + 1}", width, 1, 7)

    n_q, k = num_quantizers(config), int(config["codebook_size"])
    if r.has(f"quantizer.layers.{n_q}.codebook.embed"):
        raise ConversionError(f"the checkpoint has more than the {n_q} codebooks its target_bandwidths use")
    vq = {}
    for i in range(n_q):
        book = f"quantizer.layers.{i}.codebook"
        codebook = r.take(f"{book}.embed", (k, latent))
        if r.has(f"{book}.embed_avg") and r.has(f"{book}.cluster_size"):
            cluster_size, embed_sum = r.take(f"{book}.cluster_size", (k,)), r.take(f"{book}.embed_avg", (k, latent))
        else:
            cluster_size, embed_sum = np.full((k,), _FRESH_CLUSTER_SIZE, np.float32), _FRESH_CLUSTER_SIZE * codebook
        vq[f"levels_{i}"] = {"codebook": codebook, "cluster_size": cluster_size, "embed_sum": embed_sum,
                             "initialized": np.asarray(True)}

    model = ml_collections.ConfigDict({
        "strides": strides, "channels": channels, "latent_dim": latent, "dtype": "float32",
        "lstm_layers": lstm_layers,
        "pad_mode": "reflect" if config.get("pad_mode", "reflect") == "reflect" else "zeros",
        "split": "right", "conv_shortcut": shortcut,
        "quantizer": {"num_quantizers": n_q, "codebook_size": k, "decay": 0.99, "epsilon": 1e-5,
                      "dead_code_threshold": _FRESH_CLUSTER_SIZE, "kmeans_init": False, "kmeans_iters": 50}})
    return model, {"params": {"encoder": encoder, "decoder": decoder}, "vq_stats": {"quantizer": vq}}
