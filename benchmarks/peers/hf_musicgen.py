"""The PyTorch peer: Hugging Face `MusicgenForConditionalGeneration` sampling on CPU, random weights.

Runs inside the peer environment (benchmarks/peers/.venv, `make bench-peer`), never inside
melody-jax's: `benchmarks/peer.py` starts it as a subprocess and reads the one JSON line it prints.
Nothing is downloaded: the text encoder (T5), the audio codec (EnCodec 32 kHz, strides 8·5·4·4,
4 × codebook_size) and the decoder are built from configs written here, so the weights are random;
the input ids are random too (no tokenizer). Sampling is MusicGen's: top-k 250, temperature 1,
CFG 3 (HF runs the conditional and unconditional rows as one batch of 2), batch 1.

`max_new_tokens = steps` decoder steps (the delay pattern turns them into steps − K + 1 frames).
`seconds` is the whole `generate` call (text encoder once, the steps, the codec decoding the audio);
`codec_decode_s` is the codec's part and `steps_per_s` counts the rest, the LM loop alone.
`cpu_s` (user + system seconds of the timed call) and the load averages around it show how much of
the machine the run really had: on a shared CPU, cpu_s / seconds well under `threads` means contention.

`--checkpoint DIR` (benchmarks/hf_musicgen.py: ours and transformers on the same weights): the model
is loaded from DIR if it holds one, else built as above and saved there first (safetensors), so
our converter reads exactly the weights timed here. `--batch` rows per call (each doubled by CFG).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time


def build_model(args: argparse.Namespace):
    """MusicGen with the decoder size of the arguments, MusicGen-small's codec and a T5 encoder."""
    import torch
    from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                              T5Config)

    text = T5Config(vocab_size=32128, d_model=args.text_d_model, d_kv=args.text_d_model // args.text_heads,
                    d_ff=args.text_ffn, num_layers=args.text_layers, num_heads=args.text_heads)
    bandwidth = round(args.num_codebooks * math.log2(args.codebook_size) * 50 / 1000, 3)  # kbps of K codebooks
    codec = EncodecConfig(sampling_rate=32000, audio_channels=1, normalize=False, hidden_size=128, num_filters=64,
                          upsampling_ratios=[8, 5, 4, 4], use_causal_conv=False, codebook_size=args.codebook_size,
                          target_bandwidths=[bandwidth], use_conv_shortcut=False, num_lstm_layers=2)
    special = args.codebook_size  # MusicGen's pad / decoder-start token sits just past the codebook
    decoder = MusicgenDecoderConfig(vocab_size=args.codebook_size, hidden_size=args.d_model,
                                    num_hidden_layers=args.layers, num_attention_heads=args.heads, ffn_dim=args.ffn,
                                    num_codebooks=args.num_codebooks, pad_token_id=special, bos_token_id=special,
                                    max_position_embeddings=max(2048, args.steps + 8))
    config = MusicgenConfig.from_sub_models_config(text, codec, decoder, decoder_start_token_id=special,
                                                   pad_token_id=special)
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval()
    model.generation_config.decoder_start_token_id = special
    model.generation_config.pad_token_id = special
    return model


def param_counts(model) -> dict[str, float]:
    """Millions of parameters per part; the decoder also without its cross-attention blocks."""
    count = lambda named: sum(p.numel() for _, p in named) / 1e6  # noqa: E731
    decoder = list(model.decoder.named_parameters())
    return {"decoder_params_m": count(decoder),
            "decoder_params_without_cross_attention_m": count([(n, p) for n, p in decoder if "encoder_attn" not in n]),
            "text_encoder_params_m": count(model.text_encoder.named_parameters()),
            "audio_encoder_params_m": count(model.audio_encoder.named_parameters()),
            "total_params_m": count(model.named_parameters())}


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=4096)
    parser.add_argument("--num-codebooks", type=int, default=4)
    parser.add_argument("--codebook-size", type=int, default=2048)
    parser.add_argument("--text-d-model", type=int, default=768)
    parser.add_argument("--text-layers", type=int, default=12)
    parser.add_argument("--text-heads", type=int, default=12)
    parser.add_argument("--text-ffn", type=int, default=3072)
    parser.add_argument("--text-length", type=int, default=12, help="random prompt ids")
    parser.add_argument("--steps", type=int, default=250, help="max_new_tokens: decoder steps")
    parser.add_argument("--warmup-steps", type=int, default=8, help="a short untimed generate first")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--top-k", type=int, default=250)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--checkpoint", help="load the model from here, or build and save it here first")
    args = parser.parse_args()

    import torch
    import transformers

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, "config.json")):
        model = transformers.MusicgenForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    else:
        model = build_model(args)
        if args.checkpoint:
            model.save_pretrained(args.checkpoint, safe_serialization=True)
    build_s = time.perf_counter() - t0
    ids = torch.randint(2, 32128, (args.batch, args.text_length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    decode_times: list[float] = []
    codec_decode = model.audio_encoder.decode

    def timed_decode(*a, **k):
        start = time.perf_counter()
        out = codec_decode(*a, **k)
        decode_times.append(time.perf_counter() - start)
        return out

    model.audio_encoder.decode = timed_decode

    def generate(steps: int):
        return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, guidance_scale=args.guidance_scale,
                              top_k=args.top_k, temperature=1.0, max_new_tokens=steps)

    with torch.inference_mode():
        generate(args.warmup_steps)
        decode_times.clear()
        load_before, cpu0 = os.getloadavg()[0], _cpu_seconds()
        t0 = time.perf_counter()
        audio = generate(args.steps)
        seconds = time.perf_counter() - t0
        cpu_s, load_after = _cpu_seconds() - cpu0, os.getloadavg()[0]
    codec_s = sum(decode_times)
    frames = args.steps - args.num_codebooks + 1
    result = {"seconds": seconds, "steps": args.steps, "frames": frames, "codec_decode_s": codec_s,
              "lm_seconds": seconds - codec_s, "steps_per_s": args.steps / (seconds - codec_s),
              "steps_per_s_with_codec": args.steps / seconds, "audio_samples": int(audio.shape[-1]),
              "build_s": build_s, "cpu_s": cpu_s, "loadavg_1m_before": load_before, "loadavg_1m_after": load_after,
              "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "python": sys.version.split()[0],
              "d_model": args.d_model, "layers": args.layers, "heads": args.heads, "ffn": args.ffn,
              "num_codebooks": args.num_codebooks, "codebook_size": args.codebook_size,
              "guidance_scale": args.guidance_scale, "top_k": args.top_k, "batch": args.batch, **param_counts(model)}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
