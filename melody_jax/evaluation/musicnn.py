"""musicnn embeddings and tags: an audio model this project did not train, for FAD and tag checks.

Why musicnn (DESIGN §10): it is the one pretrained music model on the package index whose weights
ship inside the wheel (VGGish, PANNs, CLAP and openl3 download theirs), and its MagnaTagATune
tagger names instruments and tempo words. It is TensorFlow-1 graph code that needs legacy Keras,
so it runs in its own process (`python -m melody_jax.evaluation.musicnn IN.npz OUT.npz`) and never
shares one with JAX training. Two traps of its own extractor are avoided here: the log-mel is taken
in float32 (its float16 cast overflows on loud tonal audio) and the checkpoint is restored without
a bare `except` and then verified, so it can never silently run with random weights.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from typing import NamedTuple

import numpy as np

from melody_jax.training.errors import EvaluationError

SAMPLE_RATE = 16000  # musicnn's input: 16 kHz, 512-point FFT, hop 256, 96 mel bands
PATCH_SECONDS = 3.0  # the length its models were trained on
MODEL = "MTT_musicnn"


class MusicnnFeatures(NamedTuple):
    embeddings: np.ndarray  # [P, 200] the penultimate layer per 3-s patch
    clip_of_patch: np.ndarray  # [P] which clip each patch came from
    tags: np.ndarray  # [C, 50] mean tag probabilities per clip
    labels: list[str]

    def clip_embeddings(self) -> np.ndarray:
        """[C, 200]: each clip's mean patch embedding."""
        return np.stack([self.embeddings[self.clip_of_patch == c].mean(0) for c in range(len(self.tags))])


def _patch_frames() -> int:
    import librosa

    return int(librosa.time_to_frames(PATCH_SECONDS, sr=SAMPLE_RATE, n_fft=512, hop_length=256)) + 1


def log_mel_patches(audio: np.ndarray) -> np.ndarray:
    """16-kHz mono → [P, 187, 96] float32 log-mel patches (zero-padded to one whole patch)."""
    import librosa

    n = _patch_frames()
    audio = np.asarray(audio, np.float32)
    audio = np.pad(audio, (0, max(0, int(PATCH_SECONDS * SAMPLE_RATE) + 512 - len(audio))))
    mel = librosa.feature.melspectrogram(y=audio, sr=SAMPLE_RATE, hop_length=256, n_fft=512, n_mels=96).T
    mel = np.log10(10000.0 * mel.astype(np.float32) + 1.0)
    return np.stack([mel[i: i + n] for i in range(0, mel.shape[0] - n + 1, n)])


def failure(returncode: int, stderr: str) -> str:
    """One line for a failed musicnn process: the signal that killed it (its stderr then ends mid-traceback, so
    its last line says nothing), else its last stderr line."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = str(-returncode)
        hint = " (by the system: out of memory?)" if returncode == -signal.SIGKILL else ""
        return f"musicnn failed: its process was killed by signal {name}{hint}"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"musicnn failed: {lines[-1] if lines else f'exit code {returncode}'}"


def musicnn_features(clips: list[np.ndarray], sample_rate: int, model: str = MODEL,
                     timeout_s: float = 1800.0) -> MusicnnFeatures:
    """Embeddings and tags of mono clips at `sample_rate`, computed in a separate TensorFlow process."""
    import soxr

    patches, owner = [], []
    for i, clip in enumerate(clips):
        audio = clip if sample_rate == SAMPLE_RATE else soxr.resample(np.asarray(clip, np.float32), sample_rate,
                                                                      SAMPLE_RATE)
        p = log_mel_patches(audio)
        patches.append(p)
        owner.append(np.full(len(p), i))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = os.path.join(tmp, "in.npz"), os.path.join(tmp, "out.npz")
        np.savez(src, patches=np.concatenate(patches), model=model)
        env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
        done = subprocess.run([sys.executable, "-m", "melody_jax.evaluation.musicnn", src, dst], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise EvaluationError(failure(done.returncode, done.stderr))
        with np.load(dst) as out:
            patch_tags, embeddings, labels = out["tags"], out["embeddings"], [str(x) for x in out["labels"]]
    owner_all = np.concatenate(owner)
    tags = np.stack([patch_tags[owner_all == c].mean(0) for c in range(len(clips))])
    return MusicnnFeatures(embeddings, owner_all, tags, labels)


def _run_model(patches: np.ndarray, model: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Inside the worker process: musicnn's graph, its checkpoint restored and checked, one pass."""
    try:
        import musicnn
        import tensorflow as tf
        from musicnn import configuration, models
    except ImportError as e:
        raise EvaluationError(f"musicnn is not installed ({e}); `make install` installs it") from None
    labels = configuration.MTT_LABELS if model.startswith("MTT") else configuration.MSD_LABELS
    checkpoint = os.path.join(os.path.dirname(musicnn.__file__), model) + "/"
    graph = tf.Graph()
    with graph.as_default():
        with tf.name_scope("model"):
            x = tf.compat.v1.placeholder(tf.float32, [None, patches.shape[1], patches.shape[2]])
            training = tf.compat.v1.placeholder(tf.bool)
            outputs = models.define_model(x, training, model, len(labels))
        variables = tf.compat.v1.global_variables()
        try:
            reader = tf.compat.v1.train.NewCheckpointReader(checkpoint)  # the files' prefix is the folder itself
        except (tf.errors.OpError, ValueError) as e:
            raise EvaluationError(f"no musicnn checkpoint for {model!r} at {checkpoint}: {type(e).__name__}") from None
        missing = [v.op.name for v in variables if not reader.has_tensor(v.op.name)]
        if missing:
            raise EvaluationError(f"musicnn checkpoint {checkpoint} lacks {len(missing)} variables, e.g. {missing[0]}")
        session = tf.compat.v1.Session(graph=graph)
        tf.compat.v1.train.Saver().restore(session, checkpoint)
        probe = variables[0]
        if not np.allclose(session.run(probe), reader.get_tensor(probe.op.name)):
            raise EvaluationError(f"musicnn weights were not restored from {checkpoint}")
        tags, embeddings = session.run([tf.nn.sigmoid(outputs[0]), outputs[-1]],
                                       {x: patches, training: False})
    return tags, embeddings, labels


def main(argv: list[str]) -> int:
    src, dst = argv
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    with np.load(src) as data:
        patches, model = data["patches"], str(data["model"])
    tags, embeddings, labels = _run_model(patches, model)
    if not (np.all(np.isfinite(tags)) and np.all(np.isfinite(embeddings))):
        raise EvaluationError("musicnn produced non-finite outputs")
    np.savez(dst, tags=tags, embeddings=embeddings, labels=np.array(labels))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
