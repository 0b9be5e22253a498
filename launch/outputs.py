"""Writing generated audio: one WAV per output as soon as the audio exists, then its spectrogram.

Kept apart from the CLIs (which define absl flags at import) so tests and other front ends can call it.
"""
from __future__ import annotations

import os

import numpy as np


def output_paths(out: str, count: int) -> list[str]:
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext or '.wav'}" for i in range(count)]


def write_outputs(result, out: str, titles: list[str]) -> list[str]:
    """Every WAV first (the audio is what took the time), then the spectrograms; a figure that
    fails is a warning, never a lost WAV."""
    import soundfile as sf
    from absl import logging

    from melody_jax.evaluation.plots import spectrogram_png

    paths = output_paths(out, len(result.audio))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    for audio, path in zip(result.audio, paths):  # audio [T] or stereo [T, 2]
        sf.write(path, np.clip(audio, -1, 1), result.sample_rate, subtype="PCM_16")
    for audio, path, title in zip(result.audio, paths, titles):
        try:
            spectrogram_png(audio.mean(-1) if audio.ndim == 2 else audio, result.sample_rate,
                            os.path.splitext(path)[0] + ".png", title)
        except Exception as e:  # noqa: BLE001 - a figure is a convenience; the WAV is already written
            logging.warning("no spectrogram for %s: %s", path, " ".join(str(e).split())[:200])
    return paths
