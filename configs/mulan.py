"""MuLan (DESIGN §4.3): audio and text towers trained contrastively from scratch on prepared data.

`paper` has two 12-layer, 768-wide encoders (AST-base + BERT-base shapes): 170.6M parameters against
the paper's 195.3M (no BERT word-piece vocabulary or AST positional tables; bytes + rotary instead).
Every preset works at 24 kHz (the MeLoDy stages' rate); set data.path (a prepared dataset) for any preset.
"""
from configs.common import base_config, check_preset, set_fields
from data_pipeline.input import default_data_config

SIZES = {
    "tiny": {"model.audio_layers": 2, "model.text_layers": 2, "model.embed_dim": 64, "model.num_heads": 4,
             "model.mlp_dim": 128, "model.dtype": "float32", "train.batch_size": 16, "data.crop_seconds": 2.0},
    "small": {"model.audio_layers": 4, "model.text_layers": 4, "model.embed_dim": 256, "model.num_heads": 4,
              "model.mlp_dim": 1024, "model.dtype": "float32", "train.batch_size": 32, "data.crop_seconds": 10.0},
    "base": {"model.audio_layers": 6, "model.text_layers": 6, "model.embed_dim": 512, "model.num_heads": 8,
             "model.mlp_dim": 2048, "model.dtype": "bfloat16", "train.batch_size": 128, "data.crop_seconds": 10.0},
    "paper": {"model.audio_layers": 12, "model.text_layers": 12, "model.embed_dim": 768, "model.num_heads": 12,
              "model.mlp_dim": 3072, "model.dtype": "bfloat16", "train.batch_size": 256, "data.crop_seconds": 10.0},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    c = base_config("mulan")
    c.preset = preset
    c.model.out_dim = 128
    c.model.n_fft = 512 if tiny else 1024
    c.model.hop_length = 256 if tiny else 240  # 240 at 24 kHz = 100 frames/s
    c.model.n_mels = 64 if tiny else 128
    c.model.patch_frames = 4 if tiny else 16
    c.model.patch_mels = 16
    # "semitone": n_mels log-frequency bands a semitone apart from fmin (their lowest centre), which a key needs
    # (models/mulan.py FREQUENCY_SCALES); "mel" is the paper's log-mel (fmin: its lower edge)
    c.model.frequency_scale = "mel"
    c.model.fmin = 0.0
    # > 0: the audio tower also hears the autocorrelation of the onset envelope at lags 1..tempo_lags STFT frames
    # (not in the paper; models/mulan.py): 2-s windows of 43-ms patches do not place a beat's period to 5 %
    c.model.tempo_lags = 0
    # True (semitone bands): the audio tower also hears the clip's pitch-class profile (not in the paper;
    # models/mulan.py), a statistic of the whole clip where a key lives and no patch holds
    c.model.chroma_profile = False
    c.model.max_text_length = 128 if tiny else 256  # bytes, including the leading [CLS]
    c.model.remat = preset == "paper"
    c.model.scan_layers = False  # True: each tower's blocks as one nn.scan (other param names)

    c.data.update(default_data_config())
    c.data.min_segment_ratio = 0.8 if preset in ("base", "paper") else 0.0  # audiocraft MusicGen's 0.8
    c.data.source = "prepared_audio"  # data.path: a prepared dataset (launch.prepare_data)
    c.data.sample_rate = 24000  # every preset: the rate of the VAE-GAN and SSL stages it is bundled with
    c.data.shuffle_buffer = 64 if tiny else 256
    c.data.caption_probability = 0.5  # else the tag list (DESIGN §4.3: each clip paired at random)
    # Word dropout on the training texts (audiocraft's T5 conditioner; tasks/musicgen_conditions.word_dropout):
    # each word of a caption or tag list dropped with this probability. Off in every preset; the demo sets it.
    c.train.word_dropout = 0.0
    # Key-swapped captions (melody_jax/text/key_swap.py) as extra negatives of each audio row: the key is the only
    # difference, so the towers must hear it (not in the paper; NegCLIP's hard negatives). Off in every preset.
    c.train.key_negatives = False
    c.data.eval_split = "validation"  # "" = no evaluation; needs prepare_data --val_fraction > 0

    set_fields(c, SIZES[preset])
    c.train.num_steps = 300 if tiny else 50000
    c.train.eval_every = 100 if tiny else 1000
    c.train.checkpoint_every = 100 if tiny else 1000
    c.optim.lr = 2e-3 if tiny else 1e-4
    c.optim.warmup_steps = 10 if tiny else 1000
    c.optim.weight_decay = 0.0 if tiny else 0.01
    return c
