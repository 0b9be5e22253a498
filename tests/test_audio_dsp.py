"""melody_jax.audio against librosa (the reference the data pipeline uses) and loss sanity checks."""
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal

from data_pipeline.audio_io import decode
from melody_jax.audio.chroma import chroma_onehot, chromagram
from melody_jax.audio.losses import (
    PAPER_MR_STFT,
    STFTResolution,
    log_mel_l1,
    mr_stft_l1,
    multi_scale_mel_loss,
    resolutions,
)
from melody_jax.audio.mel import log_mel_spectrogram, mel_filterbank, mel_spectrogram, semitone_filterbank
from melody_jax.audio.stft import hann_window, magnitude, num_frames, stft
from tests.helpers import RECORDED_MUSIC

pytestmark = pytest.mark.filterwarnings(
    "ignore:n_fft=.* is too large:UserWarning", "ignore:Empty filters detected:UserWarning"
)

SR = 24000
# float32 FFTs (XLA vs pocketfft) agree to ~2e-7 of the peak magnitude on noise and the chirp; the
# recording's 16-sample windows reach 2.8e-6 (a quiet, low-peak spectrum); 5e-6 bounds all of them.
REL_TOL = 5e-6


def _noise(n=6000, batch=2, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, n)).astype(np.float32)


def _tonal(n=6000, sr=SR):
    """An exponential chirp 110 → 1760 Hz with two harmonics and a little noise: 'real-ish' audio."""
    t = np.arange(n) / sr
    f0 = 110.0 * (16.0 ** (t / t[-1]))
    phase = 2 * np.pi * np.cumsum(f0) / sr
    x = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    x += 0.01 * np.random.default_rng(1).standard_normal(n)
    return (0.5 * x / np.abs(x).max())[None].astype(np.float32)


def _recorded(seconds=1.0, sr=SR):
    """Real recorded music (assets/audio), decoded and resampled by the data pipeline's reader."""
    return decode(RECORDED_MUSIC, sr, 5.0, 5.0 + seconds)[None]


SIGNALS = {"noise": _noise, "tonal": _tonal, "recorded": _recorded}


def _rel_err(ours, ref):
    return float(np.abs(np.asarray(ours) - ref).max() / np.abs(ref).max())


def test_hann_window_is_periodic():
    for n in (16, 600, 4096):
        np.testing.assert_allclose(hann_window(n), scipy.signal.get_window("hann", n, fftbins=True), atol=1e-7)


@pytest.mark.parametrize(
    "res",
    [
        PAPER_MR_STFT[0], PAPER_MR_STFT[3], PAPER_MR_STFT[-1],
        STFTResolution(1024, 120, 600), STFTResolution(2048, 512, 2048),
    ],
    ids=str,
)
@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_stft_matches_librosa(res, signal):
    x = SIGNALS[signal]()
    ours = stft(jnp.asarray(x), res.n_fft, res.hop_length, res.win_length)
    ref = librosa.stft(
        x, n_fft=res.n_fft, hop_length=res.hop_length, win_length=res.win_length,
        window="hann", center=True, pad_mode="reflect",
    )
    ref = np.swapaxes(ref, -1, -2)
    frames = num_frames(x.shape[-1], res.n_fft, res.hop_length)
    assert ours.shape == ref.shape == (x.shape[0], frames, res.n_fft // 2 + 1)
    complex_err = _rel_err(ours, ref)
    mag_err = _rel_err(magnitude(ours), np.abs(ref))
    assert complex_err < REL_TOL, f"complex STFT max |err| / max |ref| = {complex_err:.2e} >= {REL_TOL}"
    assert mag_err < REL_TOL, f"magnitude max |err| / max |ref| = {mag_err:.2e} >= {REL_TOL}"


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(sr=SR, n_fft=1024, n_mels=80),
        dict(sr=32000, n_fft=2048, n_mels=128, fmin=30.0, fmax=12000.0),
        dict(sr=32000, n_fft=256, n_mels=64, fmin=64.0, htk=True, norm=None),
    ],
)
def test_mel_filterbank_matches_librosa(kwargs):
    ref = librosa.filters.mel(**kwargs).T
    ours = mel_filterbank(
        kwargs["sr"], kwargs["n_fft"], kwargs["n_mels"], kwargs.get("fmin", 0.0), kwargs.get("fmax"),
        kwargs.get("htk", False), kwargs.get("norm", "slaney"),
    )
    err = _rel_err(ours, ref)
    assert ours.shape == ref.shape
    assert err < 1e-6, f"filterbank max |err| / max |ref| = {err:.2e} >= 1e-6"


def test_semitone_bands_put_each_pitch_in_its_own_band():
    fb = semitone_filterbank(SR, 2048, 60, 220.0)
    assert fb.shape == (1025, 60) and not fb.flags.writeable
    assert (fb > 0).sum(0).min() >= 2  # every band, the narrowest included, reads FFT bins
    t = np.arange(2048) / SR
    for k in (0, 1, 12, 19, 59):  # A3, A#3, A4, E5, the top band
        tone = np.sin(2 * np.pi * 220.0 * 2 ** (k / 12) * t) * np.hanning(2048)
        bands = np.abs(np.fft.rfft(tone)) ** 2 @ fb
        assert np.argmax(bands) == k
        assert np.sort(bands)[-2] < 0.6 * bands[k]  # a semitone away reads less: the bands resolve a key
    # a mel filterbank of as many bands merges A3 and A#3 (the reason MuLan's key needs this scale)
    mel = mel_filterbank(SR, 2048, 60)
    peaks = [np.argmax(np.abs(np.fft.rfft(np.sin(2 * np.pi * f * t) * np.hanning(2048))) ** 2 @ mel)
             for f in (220.0, 220.0 * 2 ** (1 / 12))]
    assert peaks[0] == peaks[1]
    with pytest.raises(ValueError, match="narrower than half the lowest band"):
        semitone_filterbank(SR, 2048, 60, 100.0)  # FFT bins of 11.7 Hz, a lowest band 11.6 Hz wide
    with pytest.raises(ValueError, match="below Nyquist"):
        semitone_filterbank(SR, 2048, 72, 220.0)  # 6 octaves from A3 end at 14 kHz


@pytest.mark.parametrize("signal", sorted(SIGNALS))
def test_mel_and_log_mel_match_librosa(signal):
    x = SIGNALS[signal]()
    args = dict(sample_rate=SR, n_fft=1024, hop_length=256, n_mels=80)
    ref = librosa.feature.melspectrogram(
        y=x, sr=SR, n_fft=1024, hop_length=256, n_mels=80, center=True, pad_mode="reflect", power=2.0
    )
    ref = np.swapaxes(ref, -1, -2)
    ours = mel_spectrogram(jnp.asarray(x), **args)
    err = _rel_err(ours, ref)
    assert err < 1e-5, f"mel max |err| / max |ref| = {err:.2e} >= 1e-5"
    log_ref = np.log(np.maximum(ref, 1e-5))
    log_err = float(np.abs(np.asarray(log_mel_spectrogram(jnp.asarray(x), **args)) - log_ref).max())
    # Quiet bins carry the largest relative error; seen 4e-5 nats on the tonal signal.
    assert log_err < 2e-4, f"log-mel max |err| = {log_err:.2e} nats >= 2e-4"


def test_mr_stft_zero_for_identical_and_grows_with_noise():
    x = jnp.asarray(np.concatenate([_tonal(12000), _tonal(12000)[:, ::-1]]))
    noise = jnp.asarray(_noise(12000, seed=3))
    dist = jax.jit(mr_stft_l1)
    assert float(dist(x, x)) == 0.0
    values = [float(dist(x, x + a * noise)) for a in (0.001, 0.01, 0.1, 1.0)]
    assert all(b > 1.5 * a for a, b in zip(values, values[1:])), f"MR-STFT not growing with noise: {values}"
    grad_fn = jax.jit(jax.grad(lambda y: mr_stft_l1(x, y)))
    assert bool(jnp.all(jnp.isfinite(grad_fn(jnp.zeros_like(x))))), "gradient at silence must be finite"
    grad = grad_fn(x + 0.01 * noise)
    assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) > 0.0


def test_resolutions_from_config_lists():
    assert resolutions([8192, 4096, 2048, 512, 128, 64, 32], [2048, 1024, 512, 128, 32, 16, 8],
                       [4096, 2048, 1024, 256, 64, 32, 16]) == PAPER_MR_STFT
    with pytest.raises(ValueError, match="differ in length"):
        resolutions([512, 256], [128], [512, 256])
    with pytest.raises(ValueError, match="win_length <= n_fft"):
        resolutions([256], [64], [512])


def test_log_mel_l1():
    x = jnp.asarray(_tonal())
    y = x + 0.1 * jnp.asarray(_noise(batch=1, seed=4))
    args = (SR, 1024, 256, 80)
    assert float(log_mel_l1(x, x, *args)) == 0.0
    expected = np.mean(np.abs(np.asarray(log_mel_spectrogram(x, *args)) - np.asarray(log_mel_spectrogram(y, *args))))
    np.testing.assert_allclose(float(log_mel_l1(x, y, *args)), expected, rtol=1e-6)


def _audiocraft_msspec_reference(x, y, sr, scales, n_mels=64, fmin=64.0, floor=1e-5):
    """audiocraft's msspec (normalized=True, alphas=False) written out with librosa."""
    total = 0.0
    for i in scales:
        n_fft, hop = 2**i, 2**i // 4
        pad = (n_fft - hop) // 2
        mels = []
        for s in (x, y):
            s = np.pad(s, [(0, 0), (pad, pad)], mode="reflect")
            frames = 1 + int(np.ceil((s.shape[-1] - n_fft) / hop))
            s = np.pad(s, [(0, 0), (0, (frames - 1) * hop + n_fft - s.shape[-1])])
            m = librosa.feature.melspectrogram(
                y=s, sr=sr, n_fft=n_fft, hop_length=hop, n_mels=n_mels, fmin=fmin, htk=True, norm=None,
                center=False, power=2.0,
            )
            mels.append(m / np.sum(scipy.signal.get_window("hann", n_fft) ** 2))
        log_gap = np.log10(floor + mels[0]) - np.log10(floor + mels[1])
        total += np.mean(np.abs(mels[0] - mels[1])) + np.mean(log_gap**2)
    return total / (2 * len(scales))


def test_multi_scale_mel_loss_matches_audiocraft_formula():
    sr, scales = 32000, (6, 7, 8)
    x = _tonal(5001, sr)
    y = x + 0.05 * _noise(5001, batch=1, seed=5)
    ours = float(multi_scale_mel_loss(jnp.asarray(x), jnp.asarray(y), sr, scales=scales))
    ref = _audiocraft_msspec_reference(x, y, sr, scales)
    rel = abs(ours - ref) / ref
    assert rel < 1e-4, f"msspec {ours} vs reference {ref}: rel err {rel:.2e} >= 1e-4"
    assert float(multi_scale_mel_loss(jnp.asarray(x), jnp.asarray(x), sr, scales=scales)) == 0.0


def test_chroma_of_pure_tones_and_onehot():
    sr = 32000
    t = np.arange(sr) / sr
    tones = np.stack([np.sin(2 * np.pi * 440.0 * t), np.sin(2 * np.pi * 261.63 * t)])  # A4, C4
    chroma = chromagram(tones, sr)
    assert chroma.shape == (2, 1 + sr // 1024, 12) and chroma.dtype == np.float32
    onehot = chroma_onehot(chroma)
    np.testing.assert_array_equal(onehot.sum(-1), 1.0)
    assert (onehot[0].argmax(-1) == 9).all() and (onehot[1].argmax(-1) == 0).all(), "A4 → bin 9, C4 → bin 0"
    np.testing.assert_array_equal(np.asarray(chroma_onehot(jnp.asarray(chroma))), onehot)
