"""MusicGen (DESIGN §6): the codebook LM over a 4 × 2048 codec at 50 Hz, text + melody conditioned.

`small` is MusicGen-small (d 1024, 24 layers, 16 heads, FFN 4096: ≈302M in the self-attention and
FFN blocks, plus cross-attention and our text encoder); `paper` is the same; `base` is MusicGen-medium
(d 1536, 48 layers, 24 heads, FFN 6144). `tiny` trains on a 64-code synthetic rule in tests.
The `model.norm`/`positions`/`mlp_bias`/`text_*`/`melody_mode` options exist for the public
checkpoints (`python -m launch.convert`, README "Public MusicGen checkpoints"); the presets keep ours.
Data (`data.source`, melody_jax/tasks/sources.py): "synthetic" (codes from a rule, see
melody_jax/tasks/musicgen.py; tiny/small) or "codec" (paper/base: codes of the prepared audio at
`data.path` from the frozen codec in `upstream.codec`, chroma from librosa). `data.eval_split` names the
held-out split of either ("" = no evaluation).
"""
import math

import ml_collections

from configs.common import base_config, check_preset, set_fields
from data_pipeline.input import default_data_config

# The text encoder of small/base/paper is BERT-base's shape; data.frames are codec frames per example
# (50 Hz: 1500 = 30 s); model.chroma_hop_frames codec frames per chroma frame (8 → 6.25 Hz at 50 Hz).
_TEXT_BASE = {"model.text_layers": 6, "model.text_embed_dim": 768, "model.text_heads": 12, "model.text_mlp_dim": 3072}
SIZES = {
    "tiny": {"model.num_layers": 2, "model.embed_dim": 128, "model.num_heads": 4, "model.mlp_dim": 512,
             "model.text_layers": 1, "model.text_embed_dim": 64, "model.text_heads": 4, "model.text_mlp_dim": 128,
             "model.codebook_size": 64, "data.frames": 16, "model.chroma_hop_frames": 1, "train.batch_size": 16,
             "model.dtype": "float32"},
    "small": {"model.num_layers": 24, "model.embed_dim": 1024, "model.num_heads": 16, "model.mlp_dim": 4096,
              **_TEXT_BASE, "model.codebook_size": 2048, "data.frames": 1500, "model.chroma_hop_frames": 8,
              "train.batch_size": 64, "model.dtype": "bfloat16"},
    "base": {"model.num_layers": 48, "model.embed_dim": 1536, "model.num_heads": 24, "model.mlp_dim": 6144,
             **_TEXT_BASE, "model.text_layers": 12, "model.codebook_size": 2048, "data.frames": 1500,
             "model.chroma_hop_frames": 6, "train.batch_size": 64, "model.dtype": "bfloat16"},
    "paper": {"model.num_layers": 24, "model.embed_dim": 1024, "model.num_heads": 16, "model.mlp_dim": 4096,
              **_TEXT_BASE, "model.codebook_size": 2048, "data.frames": 1500, "model.chroma_hop_frames": 6,
              "train.batch_size": 64, "model.dtype": "bfloat16"},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    reference = preset in ("paper", "base")  # audiocraft's musicgen-melody recipe; tiny/small keep ours
    c = base_config("musicgen")
    c.preset = preset
    c.model.num_codebooks = 4
    c.model.pattern = "delay"  # delay | parallel | unroll | coarse_first | musiclm (audiocraft's patterns)
    # The patterns' options (None = the pattern's default; melody_jax/models/codebook_patterns.py):
    c.model.delays = None  # delay, unroll: K ints (delay: 0, 1, …, K−1); coarse_first: K−1 (one per fine codebook)
    c.model.flattening = None  # unroll: the inner step of each codebook (None = 0, 1, …, K−1: fully flattened)
    c.model.flatten_first = None  # delay: frames flattened one code per step before the delayed part
    c.model.empty_initial = None  # delay: empty steps first
    c.model.group_by = None  # musiclm: codebooks per group (None = 2)
    c.model.max_text_length = 64 if tiny else 256  # bytes, including the leading [CLS]
    c.model.use_melody = True
    c.model.chroma_n_fft = 16384 if reference else 4096  # audiocraft's chroma_stem: radix2_exp 14
    c.model.remat = not tiny
    c.model.scan_layers = False  # True: the LM's and text encoder's blocks as one nn.scan each (other param names)
    # architecture options of the public checkpoints (launch.convert sets them; the defaults are ours)
    c.model.norm = "rms"  # rms | layer
    c.model.positions = "rotary"  # rotary | sinusoidal
    c.model.mlp_bias = True
    c.model.text_encoder = "bytes"  # bytes (MuLan's text tower) | t5 (tokenizer.json in the stage directory)
    c.model.text_vocab_size = 0  # t5
    c.model.text_head_dim = 0  # t5: d_kv
    c.model.text_proj = False
    c.model.melody_mode = "prefix"  # prefix | prepend (musicgen-melody: text and chroma prepended, no cross-attention)

    c.data.update(default_data_config())  # the audio pipeline's fields (data.source="codec")
    c.data.min_segment_ratio = 0.8 if preset in ("base", "paper") else 0.0  # audiocraft MusicGen's 0.8
    del c.data["crop_seconds"]  # codec: data.frames codec frames, in samples at the codec's rate
    # synthetic | codec. paper/base train on real audio: validation refuses them until data.path and
    # upstream.codec are set.
    c.data.source = "codec" if reference else "synthetic"
    c.data.max_note_frames = 4  # synthetic melody: notes last 1..this many chroma frames
    c.data.caption_probability = 1.0  # codec: the caption, else the tag list
    # codec: the melody chroma from the full mix ("none") or from librosa's harmonic part ("hpss"), the
    # offline stand-in for audiocraft's Demucs stems (vocals + other; it removes drums, not bass). Not the
    # default: HPSS costs ≈6 s of one host core per 30-s clip (measured), ≈6 min per batch of 64.
    c.data.melody_separation = "none"
    # codec: the melody chroma from the target crop ("same": audiocraft's musicgen, whose self_wav is the
    # training segment itself, chroma cache included) or from a crop of another part of the same clip that
    # does not overlap it ("other"; the target's own crop when the clip is shorter than two crops — clips
    # are cut at prepare_data's --segment_seconds, so "other" needs segments of at least 2 × data.frames).
    c.data.melody_segment = "same"
    c.data.eval_split = "validation"
    c.data.sample_rate = 32000
    c.data.frame_rate = 50

    # audiocraft's chroma hop, 4096 samples at 32 kHz (7.8 Hz), is 6.4 codec frames; paper/base take 6
    # (3840 samples, 8.3 Hz), the nearest whole number.
    set_fields(c, SIZES[preset])
    c.model.melody_frames = math.ceil(c.data.frames / c.model.chroma_hop_frames)  # the fixed prefix length F
    c.train.num_steps = 300 if tiny else 100000
    c.train.eval_every = 150 if tiny else 2000
    c.train.checkpoint_every = 150 if tiny else 2000
    # Condition dropout (melody_jax/tasks/musicgen_conditions.py). paper/base: audiocraft's chroma2music
    # (all conditions nulled together with 0.2, then self_wav with 0.5; one draw per step for the whole
    # batch); text-to-music (model.use_melody=False) uses cfg_dropout 0.3 and cfg_dropout_melody 0 there.
    # tiny/small: text 0.3 and melody 0.2 drawn independently per example.
    c.train.cfg_dropout = 0.2 if reference else 0.0
    c.train.cfg_dropout_text = 0.0 if reference else 0.3
    c.train.cfg_dropout_melody = 0.5 if reference else 0.2
    c.train.cfg_dropout_per = "batch" if reference else "example"  # example | batch
    # Text augmentation on the host: audiocraft's word dropout (0.2 chroma2music, 0.3 text2music) and
    # description merging with the tags (merge_text_p 0.25; drop_desc_p 0.5; drop_other_p 0.5 keeps a tag).
    c.train.word_dropout = 0.2 if reference else 0.0
    c.train.merge_text_p = 0.25 if reference else 0.0
    c.train.drop_desc_p = 0.5
    c.train.drop_other_p = 0.5
    c.optim.lr = 3e-3 if tiny else 1e-4
    c.optim.warmup_steps = 10 if tiny else 4000
    c.optim.weight_decay = 0.0 if tiny else 0.1
    if not tiny:  # audiocraft's MusicGen recipe: D-Adaptation Adam at lr 1, betas (0.9, 0.95); EMA 0.99 every
        c.optim.name, c.optim.lr, c.optim.b2 = "dadapt_adamw", 1.0, 0.95  # 10 steps ≈ 0.999 every step
        c.train.ema_decay = 0.999

    c.upstream = ml_collections.ConfigDict({"codec": ""})  # data.source="codec": the codec stage's workdir
    c.sample = ml_collections.ConfigDict()
    c.sample.top_k = 250
    c.sample.top_p = 0.0  # nucleus mass; 0 = off
    c.sample.temperature = 1.0
    c.sample.duration = 10.0  # seconds, when the caller gives none
    # CFG amplifies the conditional − unconditional difference of every logit, tails included; on the
    # near-deterministic synthetic rule those tails are noise, and 3.0 breaks the tiny model's fine
    # codebooks (seen: 28 % of them right at 3.0, 100 % at 1.5), so tiny samples at 1.5.
    c.sample.cfg_scale = 1.5 if tiny else 3.0
    # audiocraft's defaults for every preset: one batched pass for both CFG branches (two_step_cfg False)
    # and plain CFG (cfg_beta None; a float guides text vs. melody twice, MusicGen-Style's cfg_coef_beta).
    c.sample.two_step_cfg = False
    c.sample.cfg_beta = None
    c.sample.window_frames = c.data.frames  # longer generations slide a window of this many frames
    c.sample.keep_frames = 8 if tiny else 600  # …keeping this many as the next window's prompt (12 s of 30)
    return c
