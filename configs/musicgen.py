"""MusicGen (DESIGN §6): the codebook LM over a 4 × 2048 codec at 50 Hz, text + melody conditioned.

`small` is MusicGen-small (d 1024, 24 layers, 16 heads, FFN 4096: ≈302M in the self-attention and
FFN blocks, plus cross-attention and our text encoder); `paper` is the same; `base` is MusicGen-medium
(d 1536, 48 layers, 24 heads, FFN 6144). `tiny` trains on a 64-code synthetic rule in tests.
Data (`data.source`): "synthetic" (codes from a rule, see melody_jax/tasks/musicgen.py) or "codec"
(codes of prepared audio from the frozen codec in `data.codec_checkpoint`, chroma from librosa).
"""
import math

import ml_collections

from configs.common import base_config, check_preset
from data_pipeline.input import default_data_config

SIZES = {  # layers, embed, heads, mlp, text (layers, embed, heads, mlp), codebook size, frames, chroma hop, batch, dtype
    "tiny": (2, 128, 4, 512, (1, 64, 4, 128), 64, 16, 1, 16, "float32"),
    "small": (24, 1024, 16, 4096, (6, 768, 12, 3072), 2048, 1500, 8, 64, "bfloat16"),
    "base": (48, 1536, 24, 6144, (12, 768, 12, 3072), 2048, 1500, 8, 64, "bfloat16"),
    "paper": (24, 1024, 16, 4096, (6, 768, 12, 3072), 2048, 1500, 8, 64, "bfloat16"),
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    layers, embed, heads, mlp, text, codebook_size, frames, chroma_hop, batch, dtype = SIZES[preset]
    tiny = preset == "tiny"
    c = base_config("musicgen")
    c.preset = preset
    c.model.num_codebooks = 4
    c.model.codebook_size = codebook_size
    c.model.pattern = "delay"  # delay | parallel | unroll | coarse_first
    c.model.delays = None  # delay pattern only; None = 0, 1, …, K−1
    c.model.num_layers = layers
    c.model.embed_dim = embed
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.text_layers, c.model.text_embed_dim, c.model.text_heads, c.model.text_mlp_dim = text
    c.model.max_text_length = 64 if tiny else 256  # bytes, including the leading [CLS]
    c.model.use_melody = True
    c.model.chroma_hop_frames = chroma_hop  # codec frames per chroma frame (8 → 6.25 Hz at 50 Hz)
    c.model.melody_frames = math.ceil(frames / chroma_hop)  # the fixed prefix length F
    c.model.dtype = dtype
    c.model.remat = not tiny

    c.data.update(default_data_config())  # the audio pipeline's fields (data.source="codec")
    del c.data["crop_seconds"]  # codec: data.frames codec frames, in samples at the codec's rate
    c.data.source = "synthetic"  # synthetic | codec
    c.data.frames = frames  # codec frames per example (50 Hz: 1500 = 30 s)
    c.data.max_note_frames = 4  # synthetic melody: notes last 1..this many chroma frames
    c.data.codec_checkpoint = ""  # codec: the codec stage's workdir
    c.data.path = ""  # codec: a prepared audio dataset at the codec's rate (launch.prepare_data)
    c.data.caption_probability = 1.0  # codec: the caption, else the tag list
    c.data.eval_split = "validation"  # codec: "" = no evaluation
    c.data.sample_rate = 32000
    c.data.frame_rate = 50

    c.train.batch_size = batch
    c.train.num_steps = 300 if tiny else 100000
    c.train.eval_every = 150 if tiny else 2000
    c.train.checkpoint_every = 150 if tiny else 2000
    c.train.cfg_dropout_text = 0.3
    c.train.cfg_dropout_melody = 0.2
    c.optim.lr = 3e-3 if tiny else 1e-4
    c.optim.warmup_steps = 10 if tiny else 4000
    c.optim.weight_decay = 0.0 if tiny else 0.1
    if not tiny:  # audiocraft's MusicGen recipe: D-Adaptation Adam at lr 1, betas (0.9, 0.95); EMA 0.99 every
        c.optim.name, c.optim.lr, c.optim.b2 = "dadapt_adamw", 1.0, 0.95  # 10 steps ≈ 0.999 every step
        c.train.ema_decay = 0.999

    c.sample = ml_collections.ConfigDict()
    c.sample.top_k = 250
    c.sample.temperature = 1.0
    # CFG amplifies the conditional − unconditional difference of every logit, tails included; on the
    # near-deterministic synthetic rule those tails are noise, and 3.0 breaks the tiny model's fine
    # codebooks (seen: 28 % of them right at 3.0, 100 % at 1.5), so tiny samples at 1.5.
    c.sample.cfg_scale = 1.5 if tiny else 3.0
    c.sample.window_frames = frames  # longer generations slide a window of this many frames
    c.sample.keep_frames = 8 if tiny else 600  # …keeping this many as the next window's prompt (12 s of 30)
    return c
