"""Audio VAE-GAN (DESIGN §4.1): 24 kHz ↔ 250 Hz × 16 latents, HiFi-GAN decoder, MPD + MRD.

Widths: encoder stage i maps channels[i] → 2·channels[i] (strided conv) and runs its MRF there;
decoder stage i maps 2·channels[i] → channels[i] (transposed conv) and runs its MRF there. `block`
is HiFi-GAN's ResBlock1 (two convs per dilation) or ResBlock2 (one).

Parameter count of `paper` (logged at the start of training, tested in tests/test_vae_gan.py):
encoder 45,386,528 (ResBlock1 MRFs at 64…512) and decoder 63,243,073 (ResBlock2 MRFs at
768…96), 108.6M in all against the paper's 100.1M (40M + 60.1M). The paper gives rates, widths
and kernels but not the block type or where the widths sit; this reading is the closest of the
HiFi-GAN layouts we counted (the others: 12.6M or 45.4M encoders, 28M or 112M decoders).

`tiny` (tests, CPU): 0.4-s crops (100 latent frames), small widths, all 7 MR-STFT resolutions
(the 8192-point one still fits a 9600-sample crop) and the multi-period discriminator only: XLA:CPU
runs the spectrogram discriminator's 2-D convs on a few channels at well under 1 GFLOP/s (≈0.8 s
per step even at 4 channels and one resolution), more than the rest of the step together; the MRD
is tested on its own (tests/test_vae_gan.py) and is on in every other preset. Tiny's MRFs have
one kernel (7) and two dilations, its MPD two conv layers: XLA:CPU compile time grows with every
distinct conv, and the tests compile this step three times. Every preset needs a prepared 24 kHz dataset
in `data.path` (`python -m launch.prepare_data --source=synthetic ...` makes one).
"""
from configs.common import base_config, check_preset, set_fields
from data_pipeline.input import default_data_config

PRESETS = {  # discriminator.period_channels: the MPD's widths; spectrogram_channels: the MRD's
    "tiny": {"model.encoder.channels": [4, 8, 8, 16], "model.encoder.block": 2,
             "model.decoder.channels": [32, 16, 16, 8], "model.decoder.block": 2,
             "model.encoder.mrf_dilations": [1, 3], "model.decoder.mrf_dilations": [1, 3],
             "discriminator.period_channels": [8, 16], "discriminator.spectrogram_channels": 4,
             "train.batch_size": 8, "data.crop_seconds": 0.4},
    "small": {"model.encoder.channels": [8, 16, 32, 64], "model.encoder.block": 1,
              "model.decoder.channels": [256, 128, 64, 32], "model.decoder.block": 2,
              "model.encoder.mrf_dilations": [1, 3, 5], "model.decoder.mrf_dilations": [1, 3, 5],
              "discriminator.period_channels": [16, 64, 128, 128], "discriminator.spectrogram_channels": 16,
              "train.batch_size": 8, "data.crop_seconds": 1.0},
    "base": {"model.encoder.channels": [16, 32, 64, 128], "model.encoder.block": 1,
             "model.decoder.channels": [512, 256, 128, 64], "model.decoder.block": 2,
             "model.encoder.mrf_dilations": [1, 3, 5], "model.decoder.mrf_dilations": [1, 3, 5],
             "discriminator.period_channels": [32, 128, 512, 1024, 1024], "discriminator.spectrogram_channels": 32,
             "train.batch_size": 16, "data.crop_seconds": 1.0},
    "paper": {"model.encoder.channels": [32, 64, 128, 256], "model.encoder.block": 1,
              "model.decoder.channels": [768, 384, 192, 96], "model.decoder.block": 2,
              "model.encoder.mrf_dilations": [1, 3, 5], "model.decoder.mrf_dilations": [1, 3, 5],
              "discriminator.period_channels": [32, 128, 512, 1024, 1024], "discriminator.spectrogram_channels": 32,
              "train.batch_size": 16, "data.crop_seconds": 1.0},
}


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    reference = preset in ("paper", "base")  # HiFi-GAN's reductions and updates; tiny/small keep ours
    mrf_kernels = [7] if tiny else [3, 7, 11]  # tiny: one receptive field (compile time, see above)
    c = base_config("vae_gan")
    c.preset = preset
    c.model.latent_dim = 16
    c.model.latent_scale = 3.0  # z = clip(z̄ / 3, -1, 1) [paper]
    c.model.dtype = "float32" if preset in ("tiny", "small") else "bfloat16"
    c.model.encoder = dict(rates=[2, 3, 4, 4], kernels=[5, 7, 9, 9], mrf_kernels=mrf_kernels)
    c.model.decoder = dict(rates=[4, 4, 3, 2], kernels=[9, 9, 5, 7], mrf_kernels=mrf_kernels)

    c.discriminator = dict(periods=[2, 3, 5, 7, 11],
                           spectrogram_resolutions=([] if tiny else  # see the docstring
                                                    [[1024, 120, 600], [2048, 240, 1200], [512, 50, 240]]),
                           stft_resolutions=[], stft_channels=32,
                           dtype=c.model.dtype)

    c.loss = dict(mr_stft=50.0, feature_matching=20.0, adversarial=1.0, kl=5e-3,  # [paper]
                  stft_n_ffts=[8192, 4096, 2048, 512, 128, 64, 32],  # [paper], all presets
                  stft_hops=[2048, 1024, 512, 128, 32, 16, 8],
                  stft_wins=[4096, 2048, 1024, 256, 64, 32, 16],
                  # "sum" (HiFi-GAN): LSGAN and feature matching summed over the sub-discriminators (and
                  # their layers), the KL summed over each example's latents; "mean": averaged, so the
                  # same weights act ≈8× weaker on the adversarial terms (8 sub-discriminators).
                  adversarial_loss="lsgan", reduction="sum" if reference else "mean",
                  balancer=False, balancer_total_norm=1.0, balancer_ema_decay=0.999,
                  # HiFi-GAN's log-mel L1 (audio.metrics.log_mel_distance) beside the paper's linear-magnitude
                  # MR-STFT, which weighs quiet upper partials next to nothing: without the MRD (tiny), the 2-hour
                  # recipe's reconstructions lie 3–22 dB low above 1 kHz, within 5 dB at weight 5 (README
                  # "Evaluation": its DPD did not render them better). 0 = the paper's loss, in every preset.
                  log_mel=0.0)

    c.data.update(default_data_config())
    c.data.min_segment_ratio = 0.8 if preset in ("base", "paper") else 0.0  # audiocraft MusicGen's 0.8
    c.data.source = "prepared_audio"  # data.path: a prepared dataset (launch.prepare_data)
    c.data.sample_rate = 24000
    c.data.shuffle_buffer = 64 if tiny else 256
    c.data.eval_split = "validation"  # "" = no evaluation; needs prepare_data --val_fraction > 0

    set_fields(c, PRESETS[preset])
    c.train.num_steps = 200 if tiny else 500_000
    c.train.eval_every = 100 if tiny else 5000
    c.train.checkpoint_every = 100 if tiny else 5000
    c.train.gan_updates = "alternating" if reference else "simultaneous"  # HiFi-GAN: D, then G on the new D
    # AdamW β = (0.8, 0.99), lr 2e-4, ×0.999 per epoch (HiFi-GAN's); both networks alike.
    c.optim.lr = 2e-3 if tiny else 2e-4
    c.optim.b1 = 0.8
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.01
    c.optim.schedule = "exponential"
    c.optim.decay_rate = 0.999
    c.optim.decay_steps = 100 if tiny else 1000  # one "epoch" [choice: data sets differ in size]
    c.optim.grad_clip_norm = 0.0  # HiFi-GAN clips nothing
    return c
