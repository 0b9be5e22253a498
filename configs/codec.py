"""MusicGen's codec (DESIGN §6): SEANet encoder/decoder at 32 kHz, 50 Hz frames, RVQ 4 × 2048.

Trained with the shared GAN step (melody_jax/tasks/gan.py) against audiocraft's multi-scale STFT
discriminator (5 scales) with its loss weights. Needs a prepared dataset at 32 kHz in `data.path`
(`python -m launch.prepare_data --sample_rate=32000 ...`). `tiny` (tests, CPU): 0.4-s crops
(20 frames), 4 × 64 codebooks, and the multi-period discriminator instead of the MS-STFT one
(XLA:CPU's 2-D convs on few channels are slow; see configs/vae_gan.py).
"""
from configs.common import base_config, check_preset, set_fields
from data_pipeline.input import default_data_config

PRESETS = {
    "tiny": {"model.channels": 8, "model.quantizer.codebook_size": 64, "train.batch_size": 8, "data.crop_seconds": 0.4},
    "small": {"model.channels": 16, "model.quantizer.codebook_size": 1024, "train.batch_size": 16,
              "data.crop_seconds": 1.0},
    "base": {"model.channels": 32, "model.quantizer.codebook_size": 2048, "train.batch_size": 32,
             "data.crop_seconds": 1.0},
    # audiocraft's 32-kHz MusicGen codec width (n_filters 64)
    "paper": {"model.channels": 64, "model.quantizer.codebook_size": 2048, "train.batch_size": 64,
              "data.crop_seconds": 1.0},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    reference = preset in ("paper", "base")  # audiocraft's compression solver; tiny/small keep ours
    c = base_config("codec")
    c.preset = preset
    c.model.strides = [8, 5, 4, 4]  # 640 samples per frame at 32 kHz = 50 Hz
    c.model.latent_dim = 128
    # EnCodec parity (converted checkpoints set them; melody_jax/models/codec.py SEANetOptions)
    c.model.lstm_layers = 0
    c.model.pad_mode = "zeros"
    c.model.split = "left"
    c.model.conv_shortcut = False
    c.model.dtype = "float32" if preset in ("tiny", "small") else "bfloat16"
    c.model.quantizer = dict(num_quantizers=4, decay=0.99, epsilon=1e-5,
                             dead_code_threshold=2.0, kmeans_init=True, kmeans_iters=10 if tiny else 50)
    stft = [[2048, 512, 2048], [1024, 256, 1024], [512, 128, 512], [256, 64, 256], [128, 32, 128]]
    c.discriminator = dict(periods=[2, 3, 5] if tiny else [], period_channels=[8, 16],
                           spectrogram_resolutions=[], spectrogram_channels=32,
                           stft_resolutions=[] if tiny else stft, stft_channels=32, dtype=c.model.dtype,
                           stft_negative_slope=0.3 if reference else 0.2)  # audiocraft's msstftd: 0.3
    c.loss = dict(l1=0.1, mel=2.0, commitment=1.0, adversarial=4.0, feature_matching=4.0,  # audiocraft
                  # audiocraft: hinge; sub-discriminators averaged ("mean"); l1, mel, adversarial and
                  # feature matching through the balancer (their weights are gradient shares).
                  adversarial_loss="hinge" if reference else "lsgan", reduction="mean",
                  balancer=reference, balancer_total_norm=1.0, balancer_ema_decay=0.999)

    c.data.update(default_data_config())
    c.data.min_segment_ratio = 0.8 if preset in ("base", "paper") else 0.0  # audiocraft MusicGen's 0.8
    c.data.source = "prepared_audio"  # data.path: a prepared dataset (launch.prepare_data)
    c.data.sample_rate = 32000
    c.data.shuffle_buffer = 64 if tiny else 256
    c.data.eval_split = "validation"

    set_fields(c, PRESETS[preset])
    c.train.num_steps = 200 if tiny else 200_000
    c.train.eval_every = 100 if tiny else 5000
    c.train.checkpoint_every = 100 if tiny else 5000
    # audiocraft steps the discriminator first and runs the updated one again for the generator.
    c.train.gan_updates = "alternating" if reference else "simultaneous"
    c.optim.lr = 1e-3 if tiny else 3e-4
    c.optim.b1 = 0.5  # audiocraft's Adam betas for the codec
    c.optim.b2 = 0.9
    c.optim.schedule = "constant"
    c.optim.grad_clip_norm = 0.0
    return c
