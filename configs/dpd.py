"""Dual-path diffusion (DESIGN §4.5): the velocity network v̂(z_δ; δ, semantic tokens).

Loss: MSE on multi-chunk velocities (M chunks per example, each at its own angle); CFG training
drops the tokens (cross-attention → self-attention) for `model.cfg_dropout` of the examples.
Data: `data.source = "synthetic"` (latents made from the tokens by the task, see
melody_jax/tasks/dpd.py) until the VAE-GAN stage can encode audio into real latents.

Parameter count of `paper`: 295,582,224 (295.6M; logged at the start of training) vs the
paper's 296.6M. The paper gives D_hid, N, K, the embeddings and the block structure but not the
Roformer depth per block, its FFN width, the BiSRU layout or where biases sit; ours (3 Roformer
layers, FFN 2560, concatenate-and-project BiSRU, biases on MLP/SRU/FiLM/IO layers only) lands
1.0M (0.3 %) below. Closing that gap would mean guessing a detail, not reproducing one.
"""
import ml_collections

from configs.common import base_config, check_preset
from melody_jax.pipelines.dpd_sampling import SAMPLE_DEFAULTS

SIZES = {  # hidden, blocks, K, heads, roformer layers, FFN, angle dim, vocab, L, T_ST, batch
    "tiny": (32, 2, 16, 2, 1, 64, 16, 32, 160, 16, 8),
    "small": (128, 4, 32, 4, 1, 256, 64, 256, 500, 50, 16),
    "base": (512, 8, 64, 8, 2, 1536, 256, 1024, 2500, 250, 32),
    "paper": (768, 8, 64, 12, 3, 2560, 256, 1024, 2500, 250, 64),
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    hidden, blocks, k, heads, layers, ffn, angle, vocab, length, tokens, batch = SIZES[preset]
    on_cpu = preset in ("tiny", "small")
    reference = preset in ("paper", "base")  # the paper's recipe; tiny/small keep ours
    c = base_config("dpd")
    c.preset = preset
    c.model.latent_dim = 16
    c.model.hidden_dim = hidden
    c.model.num_blocks = blocks
    c.model.segment_length = k  # K; S half-overlapping segments of K frames
    c.model.merge_lengths = []  # K_MS per block; [] = K / 2^min(i-1, N-i) [choice]
    c.model.num_heads = heads
    c.model.roformer_layers = layers
    c.model.mlp_dim = ffn
    c.model.angle_dim = angle
    c.model.vocab_size = vocab
    # Add each frame's token embedding to its input [choice, see models/dpd.py]: not in the paper, so
    # off for paper/base; on for tiny/small, whose synthetic tokens are otherwise ignored.
    c.model.align_tokens = not reference
    c.model.parallel_sru = preset != "tiny"  # same math; at K = 16 the sequential scan compiles faster
    c.model.remat = preset == "paper"
    c.model.dtype = "float32" if on_cpu else "bfloat16"
    c.model.num_chunks = 4  # M: multi-chunk training [paper]
    # Chunk edges in training: "even" ⌊m·L/M⌋ (625 frames each at L = 2500), or "tokens": the last M − 1
    # chunks as long as continuation's chunk (⌈T_ST/M⌉ = 63 tokens = 630 frames), so Algorithm 2
    # regenerates a chunk training noised; paper/base take "tokens" (610, 630, 630, 630).
    c.model.chunk_edges = "tokens" if reference else "even"
    c.model.cfg_dropout = 0.1  # [paper]
    c.data.source = "synthetic"  # synthetic | cached (VAE-GAN latents + semantic tokens from launch.tokenize)
    c.data.path = ""  # cached: TFRecord file or glob
    c.data.eval_path = ""  # cached: held-out records ("" = no evaluation)
    c.data.shuffle_buffer = 256
    c.data.latent_length = length  # L frames at 250 Hz (2500 = 10 s)
    c.data.token_length = tokens  # T_ST semantic tokens at 25 Hz (250 = 10 s)
    # Synthetic latents: std of each token's pattern and of the slow drift's amplitudes. At 0.4 / 0.4
    # the part the tokens give and the part the network must infer carry about equal variance.
    c.data.pattern_scale = 0.4
    c.data.drift_scale = 0.4
    c.train.batch_size = batch
    c.train.num_steps = 100 if preset == "tiny" else 20000
    c.train.log_every = 10
    c.train.eval_every = 100 if preset == "tiny" else 1000
    c.train.checkpoint_every = 100 if preset == "tiny" else 1000
    # The post-norm dual-path blocks want warm-up; tiny's 1e-2 is where both the DPD and the conv
    # baseline of tests/test_dpd_stage.py train best in 300 steps (swept 3e-3 … 1.5e-2).
    c.optim.lr = {"tiny": 1e-2, "small": 2e-3}.get(preset, 1e-4)
    c.optim.warmup_steps = 100 if preset == "tiny" else 1000
    # MeLoDy's sampling (DPD and semantic LM), stored in bundles: steps, cfg, schedule (paper | uniform),
    # temperature, top_k, top_p, duration; see melody_jax/pipelines/dpd_sampling.py
    c.sample = ml_collections.ConfigDict(SAMPLE_DEFAULTS)
    c.train.ema_decay = 0.0 if preset == "tiny" else 0.9999  # weight EMA, the standard for diffusion models
    return c
