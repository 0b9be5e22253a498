"""`python -m launch.reconstruct --checkpoint=WORKDIR --input=IN.wav --out=OUT.wav`.

Runs a file through a trained VAE-GAN (the workdir's latest checkpoint and its config.json):
decode(encode(audio)) at the model's rate (the input is resampled to it), writes the result and
prints the reconstruction metrics (MR-STFT distance, log-mel L1, SI-SNR) and the latent clip share.
"""
from __future__ import annotations

import json
import os

from absl import flags

from launch.common import quiet_library_logs, run_app, run_user_errors
from melody_jax.training.errors import UserError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A vae_gan workdir (its latest checkpoint is used).")
_INPUT = flags.DEFINE_string("input", None, "Audio file to reconstruct (any rate, mono or multichannel).")
_OUT = flags.DEFINE_string("out", None, "Where to write the reconstruction (WAV, float32).")
flags.mark_flags_as_required(["checkpoint", "input", "out"])


class InputAudioError(UserError):
    """The input file cannot be used (missing, unreadable, empty, non-finite)."""


def reconstruct(workdir: str, in_path: str, out_path: str) -> dict[str, float]:
    import jax
    import numpy as np
    import soundfile as sf

    from data_pipeline.audio_io import BadAudio, decode as read_audio
    from melody_jax.audio.losses import resolutions
    from melody_jax.audio.metrics import reconstruction_metrics
    from melody_jax.frozen.vae import FrozenVAE
    from melody_jax.models import vae_gan
    from melody_jax.training.sharding import activate, make_mesh, rules_from_config

    mesh = make_mesh({"data": -1})
    rules = rules_from_config(None)
    with activate(mesh, rules):
        vae = FrozenVAE.load(workdir, mesh, rules, field="--checkpoint")
        rate, params, model = vae.sample_rate, vae.params, vae.model
        w = vae.config.loss
        stft = resolutions(w.stft_n_ffts, w.stft_hops, w.stft_wins)
        try:
            audio = read_audio(in_path, rate)
        except BadAudio as e:
            raise InputAudioError(f"--input={in_path}: {e}") from None
        if audio.size <= model.hop:
            raise InputAudioError(f"--input={in_path}: {audio.size} samples at {rate} Hz is shorter than one "
                                  f"latent frame ({model.hop} samples)")
        x = jax.device_put(np.asarray(audio, np.float32)[None], jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec()))

        @jax.jit
        def run(params, x):
            z, stats = vae_gan.encode(params, x, model, with_stats=True)
            y = vae_gan.decode(params, z, model)[:, : x.shape[-1]]
            return y, {**reconstruction_metrics(y, x, rate, stft), **stats,
                       "latent_frames": z.shape[1]}

        y, metrics = run(params, x)
    out = np.asarray(jax.device_get(y))[0]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sf.write(out_path, out, rate, subtype="FLOAT")
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    metrics = run_user_errors(lambda: reconstruct(_CHECKPOINT.value, _INPUT.value, _OUT.value))
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    run_app(main)
