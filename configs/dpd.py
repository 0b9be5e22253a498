"""Dual-path diffusion (DESIGN §4.5): the velocity network v̂(z_δ; δ, semantic tokens).

Loss: MSE on multi-chunk velocities (M chunks per example, each at its own angle); CFG training
drops the tokens (cross-attention → self-attention) for `model.cfg_dropout` of the examples.
Data (`data.source`, melody_jax/tasks/sources.py): "synthetic" (latents made from the tokens by the task,
see melody_jax/tasks/dpd.py; tiny/small) or "cached" (VAE-GAN latents + semantic tokens that
`launch.tokenize` writes per split into the folder `data.path`; paper/base). `data.eval_split` names
the held-out split of either ("" = no evaluation).

Parameter count of `paper`: 295,582,224 (295.6M; logged at the start of training) vs the
paper's 296.6M. The paper gives D_hid, N, K, the embeddings and the block structure but not the
Roformer depth per block, its FFN width, the BiSRU layout or where biases sit; ours (3 Roformer
layers, FFN 2560, concatenate-and-project BiSRU, biases on MLP/SRU/FiLM/IO layers only) lands
1.0M (0.3 %) below. Closing that gap would mean guessing a detail, not reproducing one.
"""
import ml_collections

from configs.common import base_config, check_preset, set_fields
from melody_jax.pipelines.dpd_sampling import SAMPLE_DEFAULTS

# model.segment_length is K (S half-overlapping segments of K frames), data.latent_length L frames at
# 250 Hz (2500 = 10 s), data.token_length T_ST semantic tokens at 25 Hz (250 = 10 s).
SIZES = {
    "tiny": {"model.hidden_dim": 32, "model.num_blocks": 2, "model.segment_length": 16, "model.num_heads": 2,
             "model.roformer_layers": 1, "model.mlp_dim": 64, "model.angle_dim": 16, "model.vocab_size": 32,
             "data.latent_length": 160, "data.token_length": 16, "train.batch_size": 8},
    "small": {"model.hidden_dim": 128, "model.num_blocks": 4, "model.segment_length": 32, "model.num_heads": 4,
              "model.roformer_layers": 1, "model.mlp_dim": 256, "model.angle_dim": 64, "model.vocab_size": 256,
              "data.latent_length": 500, "data.token_length": 50, "train.batch_size": 16},
    "base": {"model.hidden_dim": 512, "model.num_blocks": 8, "model.segment_length": 64, "model.num_heads": 8,
             "model.roformer_layers": 2, "model.mlp_dim": 1536, "model.angle_dim": 256, "model.vocab_size": 1024,
             "data.latent_length": 2500, "data.token_length": 250, "train.batch_size": 32},
    "paper": {"model.hidden_dim": 768, "model.num_blocks": 8, "model.segment_length": 64, "model.num_heads": 12,
              "model.roformer_layers": 3, "model.mlp_dim": 2560, "model.angle_dim": 256, "model.vocab_size": 1024,
              "data.latent_length": 2500, "data.token_length": 250, "train.batch_size": 64},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    on_cpu = preset in ("tiny", "small")
    reference = preset in ("paper", "base")  # the paper's recipe; tiny/small keep ours
    c = base_config("dpd")
    c.preset = preset
    c.model.latent_dim = 16
    c.model.merge_lengths = []  # K_MS per block; [] = K / 2^min(i-1, N-i) [choice]
    # Add each frame's token embedding to its input [choice, see models/dpd.py]: not in the paper, so
    # off for paper/base; on for tiny/small, whose synthetic tokens are otherwise ignored.
    c.model.align_tokens = not reference
    c.model.parallel_sru = preset != "tiny"  # same math; at K = 16 the sequential scan compiles faster
    c.model.remat = preset == "paper"
    # True: the blocks as one nn.scan, the coarse path a switch over the distinct merge lengths and the
    # Roformer layers a nested scan (the fine path and each coarse variant compile once; other param names)
    c.model.scan_layers = False
    c.model.dtype = "float32" if on_cpu else "bfloat16"
    c.model.num_chunks = 4  # M: multi-chunk training [paper]
    # Chunk edges in training: "even" ⌊m·L/M⌋ (625 frames each at L = 2500), or "tokens": the last M − 1
    # chunks as long as continuation's chunk (⌈T_ST/M⌉ = 63 tokens = 630 frames), so Algorithm 2
    # regenerates a chunk training noised; paper/base take "tokens" (610, 630, 630, 630).
    c.model.chunk_edges = "tokens" if reference else "even"
    c.model.cfg_dropout = 0.1  # [paper]
    c.model.input_scale = 1.0  # the network diffuses input_scale · latents [paper: 1; see melody_jax/tasks/dpd.py]
    c.model.continuation_share = 0.0
    # paper/base train on real data: validation refuses them until data.path names the cache folder.
    c.data.source = "cached" if reference else "synthetic"
    c.data.eval_split = "validation"
    c.data.shuffle_buffer = 256
    # Synthetic latents: std of each token's pattern and of the slow drift's amplitudes. At 0.4 / 0.4
    # the part the tokens give and the part the network must infer carry about equal variance.
    c.data.pattern_scale = 0.4
    c.data.drift_scale = 0.4
    set_fields(c, SIZES[preset])
    c.train.num_steps = 100 if preset == "tiny" else 20000
    c.train.log_every = 10
    c.train.eval_every = 100 if preset == "tiny" else 1000
    c.train.checkpoint_every = 100 if preset == "tiny" else 1000
    # The post-norm dual-path blocks want warm-up; tiny's 1e-2 is where both the DPD and the conv
    # baseline of tests/test_dpd_stage.py train best in 300 steps (swept 3e-3 … 1.5e-2).
    c.optim.lr = {"tiny": 1e-2, "small": 2e-3}.get(preset, 1e-4)
    c.optim.warmup_steps = 100 if preset == "tiny" else 1000
    # MeLoDy's sampling (DPD and semantic LM), stored in bundles: steps, cfg, schedule (paper | uniform),
    # temperature, top_k, top_p, duration, inpaint_candidates; see melody_jax/pipelines/dpd_sampling.py
    c.sample = ml_collections.ConfigDict(SAMPLE_DEFAULTS)
    c.train.ema_decay = 0.0 if preset == "tiny" else 0.9999  # weight EMA, the standard for diffusion models
    return c
