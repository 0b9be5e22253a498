"""Golden fixtures for the MusicGen converter: tiny random-weight transformers models and their outputs.

Run in the PyTorch peer's venv (written for transformers 4.57.6, torch 2.13.0+cpu):
    benchmarks/peers/.venv/bin/python benchmarks/peers/fixtures_musicgen.py [--out tests/fixtures/hf]

For each variant (musicgen, musicgen-melody, musicgen-stereo) it writes `<out>/<variant>/`: the
checkpoint as `save_pretrained` writes it (config.json, safetensors; the stereo one in float16 and
sharded, to exercise the reader), the T5 tokenizer files (a tiny Unigram vocabulary trained here with
`tokenizers`, saved as T5TokenizerFast does, so tokenizer.json is what a hub checkpoint ships), and
`golden.npz` with the inputs and transformers' outputs (float32, eager attention):
- `input_ids`, `attention_mask`, `prompts`: two prompts, the second shorter (padded);
- `t5_hidden`: the T5 encoder's last hidden state;
- `decoder_input_ids [B, K, S]` (BOS-shifted delay-pattern inputs of random codes) and `logits
  [B, K, S, V]` teacher-forced (melody: also `chroma` one-hot input features and `null_logits`, the
  unconditional branch of guidance: zero text mask and chroma bin 0);
- `greedy_codes [B, K, T]` and `greedy_audio`: `generate(do_sample=False, guidance_scale=3)` (melody:
  the same greedy CFG-3 loop over the model's forward, see `melody_greedy`);
- musicgen: `uncond_codes`, greedy from `get_unconditional_inputs` (the null condition, no guidance).
Weights are redrawn at unit-ish scale (the default init at std 0.02 makes near-tied logits, so greedy
codes would hinge on rounding) and the codec's codebooks are random (transformers zero-initialises them).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (EncodecConfig, MusicgenConfig, MusicgenDecoderConfig, MusicgenForConditionalGeneration,
                          MusicgenMelodyConfig, MusicgenMelodyDecoderConfig, MusicgenMelodyForConditionalGeneration,
                          T5Config, T5TokenizerFast)

V = 64  # codebook size (the hub models: 2048; 6 bits at 1.2 kbps → 4 codebooks, as 2048 at 2.2); BOS = pad = V
PROMPTS = ["an upbeat jazz tune with piano, bass and brushed drums", "calm violin"]
CORPUS = PROMPTS + [
    "lofi hip hop beat with mellow piano chords", "epic orchestral soundtrack with strings and brass",
    "a calm melody played on the flute", "80s synth pop with a driving bass line", "acoustic guitar ballad",
    "techno track with heavy kick and hi hats", "upbeat violin music", "ambient pad drone, slow and warm",
]
FRAMES = 10  # teacher-forced frames
_TOKENIZER: dict[str, T5TokenizerFast] = {}
NEW_TOKENS = 30  # greedy: 30 new steps (BOS + 30 = 31 positions) → 31 − K frames


def tokenizer(out: str) -> T5TokenizerFast:
    """The one tokenizer of every variant (Unigram training is not deterministic), saved into `out`."""
    if out in _TOKENIZER:
        return _TOKENIZER[out]
    if _TOKENIZER:
        fast = next(iter(_TOKENIZER.values()))
        fast.save_pretrained(out)
        return _TOKENIZER.setdefault(out, fast)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0)
    fast.save_pretrained(out)
    return _TOKENIZER.setdefault(out, fast)


def configs(vocab: int, audio_channels: int = 1):
    t5 = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
                  feed_forward_proj="relu", relative_attention_num_buckets=32, relative_attention_max_distance=128)
    codec = EncodecConfig(target_bandwidths=[1.2], sampling_rate=32000, audio_channels=1, normalize=False,
                          hidden_size=16, num_filters=2, num_residual_layers=1, upsampling_ratios=[8, 5, 4, 4],
                          norm_type="weight_norm", use_causal_conv=False, pad_mode="reflect", num_lstm_layers=2,
                          codebook_size=V, use_conv_shortcut=False)
    decoder = dict(vocab_size=V, max_position_embeddings=512, num_hidden_layers=2, ffn_dim=96, num_attention_heads=4,
                   hidden_size=48, num_codebooks=4 * audio_channels, audio_channels=audio_channels, dropout=0.0,
                   pad_token_id=V, bos_token_id=V)
    return t5, codec, decoder


def redraw(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale random weights for the text encoder, projections and decoder; random codec codebooks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("audio_encoder."):
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            elif "norm" in name or name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g)) if name.endswith("weight") else \
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("codebook.embed"):
                b.copy_(torch.randn(b.shape, generator=g))


def delayed_inputs(rng: np.random.Generator, batch: int, delays: list[int]) -> np.ndarray:
    """BOS-shifted delay-pattern inputs [B, K, FRAMES + max delay] of random codes."""
    k, steps = len(delays), FRAMES + max(delays)
    codes = rng.integers(0, V, (batch, k, FRAMES))
    seq = np.full((batch, k, steps), V)
    for i, d in enumerate(delays):
        seq[:, i, d:d + FRAMES] = codes[:, i]
    return np.concatenate([np.full((batch, k, 1), V), seq[:, :, :-1]], axis=2)


def greedy(model, channels: int, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """(codes [B, K, T], audio [B, channels, samples]) of greedy generation; codes caught at the codec."""
    caught = []
    decode = model.audio_encoder.decode

    def spy(audio_codes, *args, **kw):
        caught.append(audio_codes[0].clone())
        return decode(audio_codes, *args, **kw)

    model.audio_encoder.decode = spy
    try:
        audio = model.generate(do_sample=False, max_new_tokens=NEW_TOKENS, **kwargs)
    finally:
        model.audio_encoder.decode = decode
    codes = torch.stack(caught, dim=2).flatten(1, 2) if channels == 2 else caught[0]  # [L0, R0, L1, R1, …]
    return codes.numpy().astype(np.int32), audio.numpy().astype(np.float32)


def melody_greedy(model, ids, mask, chroma, null) -> np.ndarray:
    """Greedy CFG-3 codes [B, 4, T] of musicgen-melody from its forward, recomputed at every step.

    Not `generate`: in transformers 4.57.6 MusicgenMelodyForConditionalGeneration.prepare_inputs_for_generation
    drops `encoder_hidden_states` whenever a cache object exists, which `generate` now creates before
    the first step, so its output ignores both text and melody (checked: the first call's decoder
    gets encoder_hidden_states=None).
    """
    batch, k = ids.shape[0], 4
    frames = 1 + NEW_TOKENS - k
    seq = torch.full((batch, k, 1), V)
    for t in range(NEW_TOKENS):
        flat = seq.reshape(batch * k, -1)
        cond = model(input_ids=ids, attention_mask=mask, input_features=chroma, decoder_input_ids=flat).logits[:, -1]
        uncond = model(input_ids=ids, attention_mask=torch.zeros_like(mask), input_features=null,
                       decoder_input_ids=flat).logits[:, -1]
        nxt = (uncond + 3.0 * (cond - uncond)).argmax(-1).reshape(batch, k)
        frame = t - torch.arange(k)  # position t + 1 holds frame t − k of codebook k
        nxt = torch.where((frame >= 0) & (frame < frames), nxt, torch.full_like(nxt, V))
        seq = torch.cat([seq, nxt[:, :, None]], dim=2)
    return np.stack([seq[:, i, 1 + i:1 + i + frames].numpy() for i in range(k)], axis=1).astype(np.int32)


def text_inputs(tok: T5TokenizerFast) -> dict[str, np.ndarray]:
    enc = tok(PROMPTS, padding=True, return_tensors="np")
    return {"prompts": np.array(PROMPTS), "input_ids": enc["input_ids"].astype(np.int32),
            "attention_mask": enc["attention_mask"].astype(np.int32)}


def set_generation(model) -> None:
    g = model.generation_config
    g.decoder_start_token_id = g.pad_token_id = g.bos_token_id = V
    g.do_sample, g.guidance_scale, g.max_length = False, None, 1500


def musicgen(out: str, stereo: bool) -> None:
    tok = tokenizer(out)
    channels = 2 if stereo else 1
    t5, codec, decoder = configs(len(tok), channels)
    config = MusicgenConfig.from_sub_models_config(t5, codec, MusicgenDecoderConfig(**decoder),
                                                   decoder_start_token_id=V, pad_token_id=V)
    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    redraw(model, 1 + stereo)
    if stereo:  # stored in float16 and sharded: goldens from the float16-rounded weights
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
    set_generation(model)
    golden = text_inputs(tok)
    ids, mask = torch.from_numpy(golden["input_ids"]).long(), torch.from_numpy(golden["attention_mask"]).long()
    delays = [k // channels for k in range(4 * channels)]
    dec = delayed_inputs(np.random.default_rng(3), 2, delays)
    with torch.no_grad():
        golden["t5_hidden"] = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        logits = model(input_ids=ids, attention_mask=mask,
                       decoder_input_ids=torch.from_numpy(dec).reshape(-1, dec.shape[-1])).logits
        golden["decoder_input_ids"] = dec.astype(np.int32)
        golden["logits"] = logits.reshape(dec.shape + (V,)).numpy()
        golden["greedy_codes"], golden["greedy_audio"] = greedy(model, channels, input_ids=ids, attention_mask=mask,
                                                                guidance_scale=3.0)
        if not stereo:
            golden["uncond_codes"], _ = greedy(model, channels, **model.get_unconditional_inputs(num_samples=2))
    if stereo:
        model.half().save_pretrained(out, max_shard_size="150KB")
    else:
        model.save_pretrained(out)
    np.savez_compressed(os.path.join(out, "golden.npz"), **golden)


def melody(out: str) -> None:
    tok = tokenizer(out)
    t5, codec, decoder = configs(len(tok))
    config = MusicgenMelodyConfig.from_sub_models_config(t5, codec, MusicgenMelodyDecoderConfig(**decoder),
                                                         num_chroma=12, chroma_length=16,
                                                         decoder_start_token_id=V, pad_token_id=V)
    torch.manual_seed(0)
    model = MusicgenMelodyForConditionalGeneration(config).eval()
    model.config._attn_implementation = "eager"
    redraw(model, 4)
    set_generation(model)
    golden = text_inputs(tok)
    ids, mask = torch.from_numpy(golden["input_ids"]).long(), torch.from_numpy(golden["attention_mask"]).long()
    rng = np.random.default_rng(5)
    chroma = np.eye(12, dtype=np.float32)[rng.integers(0, 12, (2, 6))]  # 6 frames, tiled to chroma_length
    null = np.zeros_like(chroma)
    null[:, :, 0] = 1
    dec = delayed_inputs(rng, 2, [0, 1, 2, 3])
    flat = torch.from_numpy(dec).reshape(-1, dec.shape[-1])
    with torch.no_grad():
        golden["t5_hidden"] = model.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
        logits = model(input_ids=ids, attention_mask=mask, input_features=torch.from_numpy(chroma),
                       decoder_input_ids=flat).logits
        null_logits = model(input_ids=ids, attention_mask=torch.zeros_like(mask), input_features=torch.from_numpy(null),
                            decoder_input_ids=flat).logits
        steps = dec.shape[-1]  # the logits of the prefix positions go
        golden.update(chroma=chroma, decoder_input_ids=dec.astype(np.int32),
                      logits=logits[:, -steps:].reshape(dec.shape + (V,)).numpy(),
                      null_logits=null_logits[:, -steps:].reshape(dec.shape + (V,)).numpy())
        golden["greedy_codes"] = melody_greedy(model, ids, mask, torch.from_numpy(chroma), torch.from_numpy(null))
        golden["greedy_audio"] = model.audio_encoder.decode(torch.from_numpy(golden["greedy_codes"]).long()[None],
                                                            [None]).audio_values.numpy()
    model.save_pretrained(out)
    np.savez_compressed(os.path.join(out, "golden.npz"), **golden)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "hf"))
    args = parser.parse_args()
    for variant, make in (("musicgen", lambda d: musicgen(d, False)), ("musicgen-stereo", lambda d: musicgen(d, True)),
                          ("musicgen-melody", melody)):
        out = os.path.join(args.out, variant)
        os.makedirs(out, exist_ok=True)
        for name in os.listdir(out):  # a rerun replaces the whole variant
            os.remove(os.path.join(out, name))
        make(out)
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        print(f"{variant}: {size / 1e3:.0f} kB in {out}")


if __name__ == "__main__":
    main()
