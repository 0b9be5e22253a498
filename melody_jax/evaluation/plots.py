"""Figures written next to generated audio."""
from __future__ import annotations

import numpy as np


def spectrogram_png(audio: np.ndarray, sample_rate: int, path: str, title: str) -> None:
    """Log-mel spectrogram of mono `audio` as a PNG (matplotlib without a display)."""
    import librosa
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mel = librosa.power_to_db(librosa.feature.melspectrogram(y=audio, sr=sample_rate, n_mels=96), ref=np.max)
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.imshow(mel, origin="lower", aspect="auto", extent=(0, len(audio) / sample_rate, 0, mel.shape[0]))
    ax.set(xlabel="seconds", ylabel="mel band")
    ax.set_title(title[:80], parse_math=False)  # a prompt like "$$" is text, not mathtext to parse
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
