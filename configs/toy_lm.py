"""Toy LM: the LLaMA-style decoder of DESIGN §4.4 on synthetic arithmetic token sequences.

Each sequence steps through the vocabulary by a stride drawn per sequence: x_t = (x_{t-1} + b) mod V.
A bigram model gets the loss down to log(num_strides); reading the stride from context gets it to ~0.
"""
from configs.common import base_config, check_preset, set_fields

SIZES = {
    "tiny": {"model.num_layers": 2, "model.embed_dim": 64, "model.num_heads": 4, "model.mlp_dim": 128,
             "data.seq_len": 32, "train.batch_size": 16},
    "small": {"model.num_layers": 4, "model.embed_dim": 256, "model.num_heads": 4, "model.mlp_dim": 1024,
              "data.seq_len": 128, "train.batch_size": 32},
    "base": {"model.num_layers": 12, "model.embed_dim": 768, "model.num_heads": 12, "model.mlp_dim": 3072,
             "data.seq_len": 256, "train.batch_size": 64},
    "paper": {"model.num_layers": 24, "model.embed_dim": 1024, "model.num_heads": 16, "model.mlp_dim": 4096,
              "data.seq_len": 512, "train.batch_size": 64},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    c = base_config("toy_lm")
    c.preset = preset
    c.model.vocab_size = 64
    c.model.dtype = "float32"
    c.model.remat = False
    c.model.attention_impl = "xla"  # xla | cudnn (GPU flash attention; needs bfloat16)
    c.model.scan_layers = False  # True: the blocks as one nn.scan (compile time flat in depth; other param names)
    c.data.source = "synthetic"  # the stride rule of melody_jax/tasks/toy_lm.py
    c.data.eval_split = "validation"
    c.data.num_strides = 4
    set_fields(c, SIZES[preset])
    c.train.num_steps = 200 if preset == "tiny" else 2000
    c.train.log_every = 10
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.optim.lr = 3e-3 if preset == "tiny" else 1e-3
    c.optim.warmup_steps = 10
    return c
