"""Toy LM: the LLaMA-style decoder of DESIGN §4.4 on synthetic arithmetic token sequences.

Each sequence steps through the vocabulary by a stride drawn per sequence: x_t = (x_{t-1} + b) mod V.
A bigram model gets the loss down to log(num_strides); reading the stride from context gets it to ~0.
"""
from configs.common import base_config, check_preset

SIZES = {  # layers, embed, heads, mlp, seq_len, batch
    "tiny": (2, 64, 4, 128, 32, 16),
    "small": (4, 256, 4, 1024, 128, 32),
    "base": (12, 768, 12, 3072, 256, 64),
    "paper": (24, 1024, 16, 4096, 512, 64),
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    layers, embed, heads, mlp, seq_len, batch = SIZES[preset]
    c = base_config("toy_lm")
    c.preset = preset
    c.model.vocab_size = 64
    c.model.num_layers = layers
    c.model.embed_dim = embed
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.attention_impl = "xla"  # xla | cudnn (GPU flash attention; needs bfloat16)
    c.model.scan_layers = False  # True: the blocks as one nn.scan (compile time flat in depth; other param names)
    c.data.seq_len = seq_len
    c.data.num_strides = 4
    c.train.batch_size = batch
    c.train.num_steps = 200 if preset == "tiny" else 2000
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-3 if preset == "tiny" else 1e-3
    c.optim.warmup_steps = 10
    return c
