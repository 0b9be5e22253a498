"""MuLan (DESIGN §4.3): audio and text towers trained contrastively from scratch on prepared data.

`paper` has two 12-layer, 768-wide encoders (AST-base + BERT-base shapes): 170.6M parameters against
the paper's 195.3M (no BERT word-piece vocabulary or AST positional tables; bytes + rotary instead).
`tiny` needs a small prepared dataset at 16 kHz (the tests prepare one); set data.path for any preset.
"""
from configs.common import base_config, check_preset
from data_pipeline.input import default_data_config

SIZES = {  # audio layers, text layers, embed, heads, mlp, batch, crop s, sample rate, dtype
    "tiny": (2, 2, 64, 4, 128, 16, 2.0, 16000, "float32"),
    "small": (4, 4, 256, 4, 1024, 32, 10.0, 24000, "float32"),
    "base": (6, 6, 512, 8, 2048, 128, 10.0, 24000, "bfloat16"),
    "paper": (12, 12, 768, 12, 3072, 256, 10.0, 24000, "bfloat16"),
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    audio_layers, text_layers, embed, heads, mlp, batch, crop, rate, dtype = SIZES[preset]
    tiny = preset == "tiny"
    c = base_config("mulan")
    c.preset = preset
    c.model.out_dim = 128
    c.model.audio_layers = audio_layers
    c.model.text_layers = text_layers
    c.model.embed_dim = embed
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.n_fft = 512 if tiny else 1024
    c.model.hop_length = 256 if tiny else 240  # 240 at 24 kHz = 100 frames/s
    c.model.n_mels = 64 if tiny else 128
    c.model.patch_frames = 4 if tiny else 16
    c.model.patch_mels = 16
    c.model.max_text_length = 128 if tiny else 256  # bytes, including the leading [CLS]
    c.model.dtype = dtype
    c.model.remat = preset == "paper"
    c.model.scan_layers = False  # True: each tower's blocks as one nn.scan (other param names)

    c.data.update(default_data_config())
    c.data.sample_rate = rate
    c.data.crop_seconds = crop
    c.data.shuffle_buffer = 64 if tiny else 256
    c.data.caption_probability = 0.5  # else the tag list (DESIGN §4.3: each clip paired at random)
    c.data.eval_split = "validation"  # "" = no evaluation; needs prepare_data --val_fraction > 0

    c.train.batch_size = batch
    c.train.num_steps = 300 if tiny else 50000
    c.train.eval_every = 100 if tiny else 1000
    c.train.checkpoint_every = 100 if tiny else 1000
    c.optim.lr = 2e-3 if tiny else 1e-4
    c.optim.warmup_steps = 10 if tiny else 1000
    c.optim.weight_decay = 0.0 if tiny else 0.01
    return c
