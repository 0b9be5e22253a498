"""melody_jax.audio.metrics against librosa/numpy references and a hand-computed SI-SNR.

STFT and mel spectrograms themselves are checked against librosa in tests/test_audio_dsp.py; here
the distances built on them are, on a clip of the synthetic music generator (real-like audio).
"""
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from data_pipeline.synthetic import generate_clip
from melody_jax.audio.losses import PAPER_MR_STFT
from melody_jax.audio.metrics import log_mel_distance, mr_stft_distance, reconstruction_metrics, si_snr

SR = 24000


@pytest.fixture(scope="module")
def pair():
    clean = generate_clip(3, duration_s=0.5, sample_rate=SR).audio
    noisy = clean + 0.01 * np.random.default_rng(0).standard_normal(clean.shape).astype(np.float32)
    return clean[None], noisy[None]


def test_mr_stft_distance_matches_librosa(pair):
    clean, noisy = pair
    spec = lambda x, r: np.abs(librosa.stft(x, n_fft=r.n_fft, hop_length=r.hop_length,  # noqa: E731
                                            win_length=r.win_length, pad_mode="reflect"))
    ref = np.mean([np.mean(np.abs(spec(noisy, r) - spec(clean, r))) for r in PAPER_MR_STFT])
    ours = float(mr_stft_distance(jnp.asarray(noisy), jnp.asarray(clean)))
    # Magnitudes agree to 2e-6 of the peak (test_audio_dsp), so the mean of their differences to < 1e-3.
    # (librosa >= 0.10 zero-pads by default; our STFT reflect-pads, as the reference here does.)
    assert abs(ours - ref) / ref < 1e-3, (ours, ref)
    assert float(mr_stft_distance(jnp.asarray(clean), jnp.asarray(clean))) < 1e-6


def test_log_mel_distance_matches_librosa(pair):
    clean, noisy = pair
    mel = lambda x: np.log(np.maximum(librosa.feature.melspectrogram(  # noqa: E731
        y=x, sr=SR, n_fft=1024, hop_length=256, n_mels=80, pad_mode="reflect"), 1e-5))
    ref = float(np.mean(np.abs(mel(noisy) - mel(clean))))
    ours = float(log_mel_distance(jnp.asarray(noisy), jnp.asarray(clean), SR))
    assert abs(ours - ref) / ref < 1e-3, (ours, ref)


def test_si_snr_hand_computed():
    ref = np.array([[1.0, -1.0, 1.0, -1.0]], np.float32)
    noise = 0.5 * np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)  # orthogonal to ref, zero mean
    est = 2.0 * ref + noise
    # Target = projection of est on ref = 2·ref (‖·‖² = 16); residual = noise (‖·‖² = 1): 10·log10(16).
    expected = 10 * np.log10(16.0)
    np.testing.assert_allclose(np.asarray(si_snr(jnp.asarray(est), jnp.asarray(ref))), [expected], atol=1e-4)
    # Scale and offset invariant: 3·est + 0.7 scores the same.
    np.testing.assert_allclose(np.asarray(si_snr(jnp.asarray(3 * est + 0.7), jnp.asarray(ref))), [expected],
                               atol=1e-4)
    assert float(si_snr(jnp.asarray(ref), jnp.asarray(ref))[0]) > 80.0


def test_reconstruction_metrics_order_a_better_and_a_worse_estimate(pair):
    clean, noisy = pair
    worse = noisy + 0.05 * np.random.default_rng(1).standard_normal(noisy.shape).astype(np.float32)
    good = reconstruction_metrics(jnp.asarray(noisy), jnp.asarray(clean), SR)
    bad = reconstruction_metrics(jnp.asarray(worse), jnp.asarray(clean), SR)
    assert set(good) == {"mr_stft", "log_mel_l1", "si_snr_db"}
    assert good["mr_stft"] < bad["mr_stft"] and good["log_mel_l1"] < bad["log_mel_l1"]
    assert good["si_snr_db"] > bad["si_snr_db"] + 10.0, (good, bad)  # 5× the noise amplitude ≈ −14 dB
