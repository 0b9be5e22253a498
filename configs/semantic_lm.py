"""Semantic LM (DESIGN §4.4): 12 MuLan RVQ tokens ⊕ 25-Hz semantic tokens, loss on the semantic ones.

`paper` is 24 layers, d 1024, 16 heads, FFN 4096: 417.3M parameters (the paper reports 429.5M).
Data (`data.source`): "synthetic" (a learnable token rule, see melody_jax/tasks/semantic_lm.py),
"cached" (TFRecords from `launch.tokenize`), or "frozen_models" (audio crops tokenised inside the step
by the ssl/kmeans/mulan/rvq stages named in `upstream`). 10 s of audio = 250 semantic tokens.
"""
import ml_collections

from configs.common import base_config, check_preset

SIZES = {  # layers, embed, heads, mlp, semantic tokens per example, batch, dtype
    "tiny": (2, 64, 4, 128, 20, 16, "float32"),
    "small": (4, 256, 4, 1024, 250, 32, "float32"),
    "base": (12, 768, 12, 3072, 250, 64, "bfloat16"),
    "paper": (24, 1024, 16, 4096, 250, 64, "bfloat16"),
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    layers, embed, heads, mlp, semantic_len, batch, dtype = SIZES[preset]
    c = base_config("semantic_lm")
    c.preset = preset
    c.model.num_layers = layers
    c.model.embed_dim = embed
    c.model.num_heads = heads
    c.model.mlp_dim = mlp
    c.model.dtype = dtype
    c.model.remat = preset == "paper"
    c.model.attention_impl = "xla"  # xla | cudnn (GPU flash attention; needs bfloat16)
    c.model.scan_layers = False  # True: the blocks as one nn.scan (compile time flat in depth; other param names)
    c.model.num_mulan_tokens = 12
    c.model.mulan_codebook_size = 1024
    c.model.semantic_vocab_size = 1024

    c.data.source = "synthetic"  # synthetic | cached | frozen_models
    c.data.semantic_len = semantic_len
    c.data.synthetic_codes = 32 if preset == "tiny" else 1024  # codes the synthetic rule uses (≤ both vocabularies)
    c.data.num_strides = 4
    c.data.path = ""  # cached: a TFRecord file or glob written by token_records.write_token_records
    c.data.eval_path = ""  # cached: held-out records for evaluation ("" = no evaluation)
    c.data.shuffle_buffer = 1024
    c.data.sample_rate = 24000
    c.data.eval_split = "validation"
    c.data.cycle_length = 4
    c.data.prefetch_batches = 2

    c.train.batch_size = batch
    c.train.num_steps = 150 if preset == "tiny" else 20000
    c.train.log_every = 10
    c.train.eval_every = 50 if preset == "tiny" else 1000
    c.train.checkpoint_every = 50 if preset == "tiny" else 1000
    c.optim.lr = 3e-3 if preset == "tiny" else 3e-4
    c.optim.warmup_steps = 10 if preset == "tiny" else 1000
    c.optim.weight_decay = 0.0 if preset == "tiny" else 0.1
    # frozen_models: audio from a prepared dataset (data.path), tokenised in the step by these stages' workdirs
    c.upstream = ml_collections.ConfigDict({"ssl": "", "kmeans": "", "mulan": "", "rvq": ""})
    return c
