"""Semantic LM (DESIGN §4.4): 12 MuLan RVQ tokens ⊕ 25-Hz semantic tokens, loss on the semantic ones.

`paper` is 24 layers, d 1024, 16 heads, FFN 4096: 417.3M parameters (the paper reports 429.5M).
Data (`data.source`, melody_jax/tasks/sources.py): "synthetic" (a learnable token rule, see
melody_jax/tasks/semantic_lm.py; tiny/small), "cached" (the records `launch.tokenize` writes per split into
the folder `data.path`; paper/base), or "frozen_models" (crops of the prepared dataset `data.path`
tokenised inside the step by the ssl/kmeans/mulan/rvq stages named in `upstream`). `data.eval_split`
names the held-out split of any of them ("" = no evaluation). 10 s of audio = 250 semantic tokens.
"""
import ml_collections

from configs.common import base_config, check_preset, set_fields

# data.semantic_len: semantic tokens per example. tiny's vocabularies are the tiny k-means' 32 clusters
# and the tiny RVQ's 16 codes, and its 16 tokens the tiny DPD's window: the tiny stages compose.
SIZES = {
    "tiny": {"model.num_layers": 2, "model.embed_dim": 64, "model.num_heads": 4, "model.mlp_dim": 128,
             "model.semantic_vocab_size": 32, "model.mulan_codebook_size": 16, "data.semantic_len": 16,
             "train.batch_size": 16, "model.dtype": "float32"},
    "small": {"model.num_layers": 4, "model.embed_dim": 256, "model.num_heads": 4, "model.mlp_dim": 1024,
              "model.semantic_vocab_size": 1024, "model.mulan_codebook_size": 1024, "data.semantic_len": 250,
              "train.batch_size": 32, "model.dtype": "float32"},
    "base": {"model.num_layers": 12, "model.embed_dim": 768, "model.num_heads": 12, "model.mlp_dim": 3072,
             "model.semantic_vocab_size": 1024, "model.mulan_codebook_size": 1024, "data.semantic_len": 250,
             "train.batch_size": 64, "model.dtype": "bfloat16"},
    "paper": {"model.num_layers": 24, "model.embed_dim": 1024, "model.num_heads": 16, "model.mlp_dim": 4096,
              "model.semantic_vocab_size": 1024, "model.mulan_codebook_size": 1024, "data.semantic_len": 250,
              "train.batch_size": 64, "model.dtype": "bfloat16"},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    c = base_config("semantic_lm")
    c.preset = preset
    set_fields(c, SIZES[preset])
    c.model.remat = preset == "paper"
    c.model.attention_impl = "xla"  # xla | cudnn (GPU flash attention; needs bfloat16)
    c.model.scan_layers = False  # True: the blocks as one nn.scan (compile time flat in depth; other param names)
    c.model.num_mulan_tokens = 12
    # share of training rows whose MuLan prefix is replaced by the null prefix, so sampling can guide the LM
    # (`sample.lm_cfg` of the bundle's DPD config) [not in the paper; audiocraft drops its text 0.3 of the time]
    c.model.cfg_dropout = 0.0

    # paper/base train on real data: validation refuses them until data.path names the cache folder.
    c.data.source = "cached" if preset in ("paper", "base") else "synthetic"
    c.data.min_segment_ratio = 0.8 if preset in ("base", "paper") else 0.0  # frozen_models crops; audiocraft's 0.8
    # codes the synthetic rule uses (≤ both vocabularies)
    c.data.synthetic_codes = min(c.model.semantic_vocab_size, c.model.mulan_codebook_size)
    c.data.num_strides = 4
    c.data.shuffle_buffer = 1024
    # share of rows conditioned on their caption's MuLan text tokens, not their audio's (cached/frozen_models)
    c.data.text_token_share = 0.0
    c.data.sample_rate = 24000
    c.data.eval_split = "validation"
    c.data.cycle_length = 4
    c.data.prefetch_batches = 2

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
