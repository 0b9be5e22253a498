"""Golden fixtures for the EnCodec converter: tiny random-weight transformers `EncodecModel`s shaped
like facebook/encodec_32khz, saved as checkpoint directories with their outputs.

Runs in the PyTorch peer environment (benchmarks/peers/.venv; written for transformers 4.57.6 and
torch 2.13.0), never at test time: `make fixtures` writes tests/fixtures/hf/, which is committed, and
tests/test_hf_encodec.py compares our converted codec against golden.npz with numpy and JAX alone.

Two variants, each a directory with config.json, model.safetensors and golden.npz:
- `encodec_32khz`: the 32-kHz layout (strides 8·5·4·4 with the stride-5 stage, 2-layer LSTM, reflect
  padding, non-causal, 4 × 2048 codebooks, no conv shortcuts), narrow (2 filters, 8-d latent) so the
  files stay small; float32, weight norm under torch's parametrization names
  (`parametrizations.weight.original0/1`), without the codebooks' EMA statistics (embed_avg,
  cluster_size: training state only, and half the file).
- `encodec_32khz_legacy`: the same layout with conv shortcuts in the residual blocks and 256 codes,
  stored in bfloat16 under the old weight-norm names (`weight_g` / `weight_v`). Its weights are
  rounded to bfloat16 before the golden outputs are computed, so the outputs are those of the stored
  weights exactly.

Random init leaves EnCodec's codebooks at zero, so each level's codebook is drawn around the
residual it will quantize (from the encoder's output on noise), with clear nearest codes (`fill_codebooks`).
golden.npz: `audio [B, T]` (T not a multiple of the 640-sample hop, to exercise EnCodec's padding),
`latent [B, D, frames]` (the encoder's output), `codes [B, n_q, frames]`, `decoded [B, frames·640]`,
and `short_audio [1, 500]` (under one frame) with its `short_codes` and `short_decoded`.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import EncodecConfig, EncodecModel


def build(codebook_size: int, conv_shortcut: bool, seed: int) -> EncodecModel:
    """4 codebooks: bandwidth = 4 × log2(codebook_size) bits × 50 Hz (2.2 kbps at 2048 codes, as 32 kHz)."""
    bandwidth = 4 * np.log2(codebook_size) * 50 / 1000 + 0.05
    config = EncodecConfig(sampling_rate=32000, audio_channels=1, normalize=False, chunk_length_s=None,
                           hidden_size=8, num_filters=2, upsampling_ratios=[8, 5, 4, 4], use_causal_conv=False,
                           pad_mode="reflect", num_lstm_layers=2, codebook_size=codebook_size,
                           target_bandwidths=[round(bandwidth, 2)], use_conv_shortcut=conv_shortcut)
    torch.manual_seed(seed)
    return EncodecModel(config).eval()


def _distinct(x: torch.Tensor) -> list[int]:
    """Indices of rows of x farther than a tenth of x's spread (squared distance ≥ 1e-2 of the total
    variance) from every earlier kept row."""
    close, kept = 1e-2 * x.var(0).sum(), []
    for i in range(len(x)):
        if all((x[i] - x[j]).pow(2).sum() >= close for j in kept):
            kept.append(i)
    return kept


@torch.no_grad()
def fill_codebooks(model: EncodecModel, inputs: list[torch.Tensor], dtype: torch.dtype, seed: int) -> None:
    """Codebooks for the inputs' encodings: per level, one row near each residual vector (at 0.5 of
    the residual's spread, at random indices; vectors nearly equal to an earlier one share its row)
    and the other rows random at 3× the spread, so codes spread over the codebook and each level
    halves the residual.

    A level's draw is kept only if every vector's nearest code beats the second nearest by 1e-6 of the
    encodings' mean squared norm (~100× the float32 error of a distance here): with rows drawn just
    around the vectors, near-ties (seen: 3e-11) let float32 rounding (another XLA build, other
    flags) pick the other code. Rows are rounded to the
    stored dtype before the check."""
    generator = torch.Generator().manual_seed(seed)
    residual = torch.cat([model.encoder(x[:, None]).transpose(1, 2).reshape(-1, model.config.hidden_size)
                          for x in inputs]).double()
    size, margin = model.config.codebook_size, 1e-6 * residual.pow(2).sum(-1).mean()
    for layer in model.quantizer.layers:
        spread = residual.std(0)
        for _ in range(100):
            randn = lambda n: torch.randn(n, residual.shape[1], generator=generator, dtype=torch.float64)  # noqa: E731
            embed = residual.mean(0) + 3 * randn(size) * spread
            near = residual[_distinct(residual)]
            embed[torch.randperm(size, generator=generator)[:len(near)]] = near + 0.5 * randn(len(near)) * spread
            embed = embed.to(dtype).double()
            nearest = torch.cdist(residual, embed).pow(2).topk(2, largest=False)
            if (nearest.values[:, 1] - nearest.values[:, 0]).min() > margin:
                break
        else:
            raise RuntimeError("no codebook draw with clear nearest codes; change the seed")
        layer.codebook.embed.copy_(embed.float())
        layer.codebook.cluster_size.fill_(1.0)
        layer.codebook.embed_avg.copy_(embed.float())
        residual = residual - embed[nearest.indices[:, 0]]


@torch.no_grad()
def golden(model: EncodecModel, audio: torch.Tensor, short: torch.Tensor) -> dict[str, np.ndarray]:
    """Outputs for `audio` and for `short` (under one frame: the deepest convs see fewer frames than
    their padding, EnCodec's zero-extended reflect case)."""
    out = {"latent": model.encoder(audio[:, None]).numpy()}
    for name, x in (("", audio), ("short_", short)):
        encoded = model.encode(x[:, None])
        decoded = model.decode(encoded.audio_codes, encoded.audio_scales).audio_values[:, 0]
        out.update({f"{name}audio": x.numpy(), f"{name}codes": encoded.audio_codes[0].numpy().astype(np.int32),
                    f"{name}decoded": decoded.numpy()})  # codes: [B, n_q, frames] (one chunk)
    return out


def legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torch's old weight-norm names: parametrizations.weight.original0/1 → weight_g / weight_v."""
    return {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1",
                                                                              "weight_v"): v
            for k, v in state.items()}


def save(model: EncodecModel, out: str, outputs: dict[str, np.ndarray], dtype: torch.dtype, legacy: bool) -> None:
    """Without the legacy variant's codebook EMA statistics (training state; half the file's size)."""
    os.makedirs(out, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()
             if v.is_floating_point() and (legacy or not k.endswith(("embed_avg", "cluster_size")))}
    save_file(legacy_names(state) if legacy else state, os.path.join(out, "model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f, indent=1, sort_keys=True)
    np.savez_compressed(os.path.join(out, "golden.npz"), **outputs)
    print(out, {k: v.shape for k, v in outputs.items()},
          f"{os.path.getsize(os.path.join(out, 'model.safetensors')) / 1e3:.0f} kB")


def make(out: str, codebook_size: int, conv_shortcut: bool, dtype: torch.dtype, legacy: bool, seed: int) -> None:
    torch.set_num_threads(2)
    model = build(codebook_size, conv_shortcut, seed)
    if dtype != torch.float32:  # the golden outputs are those of the weights as stored
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.copy_(tensor.to(dtype).float())
    generator = torch.Generator().manual_seed(seed + 1)
    audio = 0.3 * torch.randn(2, 7 * 640 - 97, generator=generator)
    short = 0.3 * torch.randn(1, 500, generator=generator)
    fill_codebooks(model, [audio, short], dtype, seed + 2)
    save(model, out, golden(model, audio, short), dtype, legacy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/fixtures/hf")
    args = parser.parse_args()
    make(os.path.join(args.out, "encodec_32khz"), 2048, False, torch.float32, legacy=False, seed=0)
    make(os.path.join(args.out, "encodec_32khz_legacy"), 256, True, torch.bfloat16, legacy=True, seed=10)


if __name__ == "__main__":
    main()
