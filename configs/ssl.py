"""Conformer SSL pre-training (DESIGN §4.2): the semantic tokenizer's encoder, before k-means.

`model.objective`: "wav2vec2" (the paper's: contrastive over a Gumbel codebook; every preset: at tiny scale
HuBERT, with `conv_norm="group"`, beats the untrained encoder on every probed attribute only with weighted
MFCC / chroma / log-mel codebooks, by small margins, and reads the key worse, README "What semantic tokens
carry") or "hubert" (masked prediction of `num_targets` k-means clusters of `target_features` frames, one
codebook and head per entry, fitted on the first `target_batches` batches; the demo's choice, with log-mel and
chroma codebooks: configs/melody.py DEMO_CHANGES).
HuBERT's second iteration: `upstream.ssl=DIR` clusters that trained SSL model's block `target_layer`
(-1 = middle) instead of the acoustic features.

Parameter counts (from `jax.eval_shape` of the model): tiny 0.15M, small 6.7M, base 57.2M, paper 200.6M
against the paper's 199.5M (paper: D 768, 14 Conformer blocks, FFN 3072, 12 heads, conv kernel 31,
5 × 512-channel feature convs, G = 2 × V = 320 codes of 768 dims). Gumbel temperature anneals
exponentially from `gumbel_start` to `gumbel_end` over `gumbel_anneal_steps` (wav2vec 2.0: 2 → 0.5;
fairseq's ×0.999995 per step reaches 0.5 after ~277k steps). `tiny` is 1.6-s crops, 200 steps on CPU in minutes;
set data.path (a dataset prepared at 24 kHz) for every preset.
"""
import ml_collections

from configs.common import base_config, check_preset, set_fields
from data_pipeline.input import default_data_config

SIZES = {  # model.conv_channels: the width of each of the 5 feature convs
    "tiny": {"model.conv_channels": [16] * 5, "model.embed_dim": 64, "model.num_layers": 2, "model.num_heads": 4,
             "model.mlp_dim": 128, "model.conv_kernel": 7, "model.num_vars": 16, "model.codevector_dim": 64,
             "model.final_dim": 64, "train.batch_size": 16, "data.crop_seconds": 1.6},
    "small": {"model.conv_channels": [128] * 5, "model.embed_dim": 256, "model.num_layers": 4, "model.num_heads": 4,
              "model.mlp_dim": 1024, "model.conv_kernel": 15, "model.num_vars": 64, "model.codevector_dim": 128,
              "model.final_dim": 128, "train.batch_size": 16, "data.crop_seconds": 5.0},
    "base": {"model.conv_channels": [512] * 5, "model.embed_dim": 512, "model.num_layers": 8, "model.num_heads": 8,
             "model.mlp_dim": 2048, "model.conv_kernel": 31, "model.num_vars": 320, "model.codevector_dim": 256,
             "model.final_dim": 256, "train.batch_size": 64, "data.crop_seconds": 10.0},
    "paper": {"model.conv_channels": [512] * 5, "model.embed_dim": 768, "model.num_layers": 14, "model.num_heads": 12,
              "model.mlp_dim": 3072, "model.conv_kernel": 31, "model.num_vars": 320, "model.codevector_dim": 768,
              "model.final_dim": 768, "train.batch_size": 128, "data.crop_seconds": 10.0},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    c = base_config("ssl")
    c.preset = preset
    m = c.model
    m.arch = "conformer"  # "hubert": a converted HuBERT/MERT (launch.convert), frozen: k-means fits on it
    m.conv_strides = [5, 4, 4, 4, 3]  # total 960: 25 Hz at 24 kHz
    m.objective = "wav2vec2"
    m.num_targets = 24 if tiny else 100  # HuBERT's first iteration: 100 MFCC clusters; tiny: measured best
    m.target_features = ["mfcc", "chroma"]  # two codebooks, timbre and pitch class (MERT's acoustic + musical)
    m.target_weights = []  # one loss weight per target_features codebook; [] = 1 each
    m.target_layer = -1  # with upstream.ssl: the block clustered for iteration 2 (-1 = middle)
    m.unmasked_weight = 1.0 if tiny else 0.0  # HuBERT: α = 1, masked frames only; tiny: measured best
    m.target_batches = 8 if tiny else 32
    m.num_groups = 2
    m.dropout = 0.0 if tiny else 0.1
    m.mask_prob = 0.65  # fairseq meaning: a span starts at a frame with probability mask_prob / mask_length
    m.mask_length = 2 if tiny else 10  # tiny: short gaps, learnable in 200 CPU steps
    m.num_negatives = 10 if tiny else 100  # K distractors; chance accuracy = 1 / (K + 1)
    m.logit_temperature = 0.1
    m.diversity_weight = 0.2 if tiny else 0.1  # tiny: keeps the 32-code book from collapsing
    m.feature_penalty_weight = 1.0 if tiny else 10.0  # wav2vec 2.0 base: 10 × L2 of the conv features
    m.gumbel_start = 2.0
    m.gumbel_end = 0.5
    m.gumbel_anneal_steps = 200 if tiny else 20000 if preset == "small" else 277000
    m.normalize_audio = True
    m.conv_norm = "layer"  # "layer": LayerNorm per frame after every feature conv; "group": first conv, per clip
    m.dtype = "float32" if preset in ("tiny", "small") else "bfloat16"
    m.remat = preset == "paper"
    m.scan_layers = False  # True: the Conformer blocks as one nn.scan (other param names)

    c.upstream = ml_collections.ConfigDict({"ssl": ""})  # HuBERT iteration 2: the trained ssl stage's workdir

    c.data.update(default_data_config())
    c.data.min_segment_ratio = 0.8 if preset in ("base", "paper") else 0.0  # audiocraft MusicGen's 0.8
    c.data.source = "prepared_audio"  # data.path: a prepared dataset (launch.prepare_data)
    c.data.sample_rate = 24000
    c.data.shuffle_buffer = 64 if tiny else 256
    c.data.eval_split = "validation"  # "" = no evaluation; needs prepare_data --val_fraction > 0

    set_fields(c, SIZES[preset])
    c.train.num_steps = 200 if tiny else 20000 if preset == "small" else 400000
    c.train.eval_every = 100 if tiny else 2000
    c.train.checkpoint_every = 100 if tiny else 2000
    c.optim.lr = 2e-3 if tiny else 5e-4 if preset == "small" else 3e-4
    c.optim.warmup_steps = 20 if tiny else 2000 if preset == "small" else 32000
    c.optim.b2 = 0.98
    c.optim.weight_decay = 0.0 if tiny else 0.01
    c.optim.grad_clip_norm = 10.0
    return c
