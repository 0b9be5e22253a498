"""Golden fixtures for the HuBERT converter: tiny random-weight transformers `HubertModel`s saved as
checkpoint directories with their hidden states.

Runs in the PyTorch peer environment (benchmarks/peers/.venv; written for transformers 4.57.6 and
torch 2.13.0), never at test time: `make fixtures` writes tests/fixtures/hf/, which is committed, and
tests/test_hf_hubert.py compares our converted tower against golden.npz with numpy and JAX alone.

Two variants, each a directory with config.json, preprocessor_config.json, model.safetensors and
golden.npz, both with HuBERT's 16-kHz conv stack (kernels 10·3·3·3·3·2·2, strides 5·2·…·2: 320
samples a frame) and positional conv (kernel 128, 16 groups), narrow (8 conv channels, 32 wide, 3
blocks) so the files stay small:
- `hubert`: hubert-base's layout: GroupNorm after the first conv only ("group"), no conv biases,
  post-LN blocks; weight norm under torch's parametrization names (`parametrizations.weight.original0/1`).
- `hubert-stable`: hubert-large's: LayerNorm after every conv ("layer"), conv biases, pre-LN blocks
  with a final LayerNorm (`do_stable_layer_norm`); weight norm under the old names (`weight_g` / `weight_v`).
Random init leaves LayerNorm/GroupNorm at identity and biases at zero, so those are redrawn.
golden.npz: `audio [2, N]` with `mask [2, N]` (the second clip padded with zeros after 5,111 samples),
`states [L + 1, 2, F, D]` (`output_hidden_states` with that attention mask), and `single_audio [1, M]`
with `single_states [L + 1, 1, F', D]` (no mask).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import HubertConfig, HubertModel

from fixtures_encodec import legacy_names


def build(stable: bool, seed: int) -> HubertModel:
    config = HubertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                          conv_dim=[8] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2],
                          conv_bias=stable, feat_extract_norm="layer" if stable else "group",
                          do_stable_layer_norm=stable, num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
                          mask_time_prob=0.0, vocab_size=32)
    config.architectures = ["HubertModel"]
    torch.manual_seed(seed)
    model = HubertModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layer_norm.weight", "layer_norm.bias", ".bias")):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.2 * torch.randn_like(p))
    return model


@torch.no_grad()
def golden(model: HubertModel, seed: int) -> dict[str, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)
    audio = 0.3 * torch.randn(2, 8000, generator=generator)
    mask = torch.ones(2, 8000, dtype=torch.long)
    audio[1, 5111:], mask[1, 5111:] = 0.0, 0
    states = model(audio, attention_mask=mask, output_hidden_states=True).hidden_states
    single = 0.3 * torch.randn(1, 6397, generator=generator)
    single_states = model(single, output_hidden_states=True).hidden_states
    return {"audio": audio.numpy(), "mask": mask.numpy().astype(np.int32),
            "states": torch.stack(states).numpy(), "single_audio": single.numpy(),
            "single_states": torch.stack(single_states).numpy()}


def save(model: HubertModel, out: str, outputs: dict[str, np.ndarray], legacy: bool) -> None:
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}
    save_file(legacy_names(state) if legacy else state, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=1, sort_keys=True)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:  # as facebook/hubert-base-ls960's
        json.dump({"feature_extractor_type": "Wav2Vec2FeatureExtractor", "sampling_rate": 16000,
                   "do_normalize": model.config.do_stable_layer_norm, "feature_size": 1, "padding_value": 0.0,
                   "return_attention_mask": model.config.do_stable_layer_norm}, f, indent=1, sort_keys=True)
    np.savez_compressed(os.path.join(out, "golden.npz"), **outputs)
    print(out, sorted(state)[:3], {k: v.shape for k, v in outputs.items()},
          f"{os.path.getsize(os.path.join(out, 'model.safetensors')) / 1e3:.0f} kB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/hf")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name, stable, seed in (("hubert", False, 0), ("hubert-stable", True, 10)):
        model = build(stable, seed)
        save(model, os.path.join(args.out, name), golden(model, seed + 1), legacy=stable)


if __name__ == "__main__":
    main()
