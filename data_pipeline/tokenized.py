"""A prepared dataset run through the frozen stages once: the cached records of the semantic LM and DPD.

What `launch.tokenize` (and the demo) write: per crop of every clip, its VAE latents, semantic
tokens and MuLan tokens as TFRecords, one file per split in a cache folder (`data.source=cached`,
`data.path` the folder, `data.eval_split` the held-out file: melody_jax/tasks/sources.py).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from data_pipeline.builder import read_clips
from melody_jax.frozen.mulan import FrozenMuLan
from melody_jax.frozen.semantic import SemanticTokenizer
from melody_jax.frozen.vae import FrozenVAE
from melody_jax.tasks.sources import records_path
from melody_jax.training.errors import ConfigError
from melody_jax.training.sharding import Rules


def crops(audio: np.ndarray, length: int) -> np.ndarray:
    """[T] → [n, length]: the whole non-overlapping crops of one clip (none if shorter)."""
    n = len(audio) // length
    return np.asarray(audio[: n * length], np.float32).reshape(n, length)


def tokenize_clips(clips: list[np.ndarray], vae: FrozenVAE, tokenizer: SemanticTokenizer, mulan: FrozenMuLan,
                   crop: int, batch_size: int) -> dict[str, np.ndarray]:
    """{latents [N, L, D], semantic_tokens [N, T], mulan_tokens [N, Q]} of every whole crop."""
    audio = np.concatenate([crops(c, crop) for c in clips] or [np.zeros((0, crop), np.float32)])
    if len(audio) == 0:
        raise ConfigError(f"--crop_seconds: no clip of the dataset is {crop} samples long")
    out: dict[str, list[np.ndarray]] = {"latents": [], "semantic_tokens": [], "mulan_tokens": []}
    for start in range(0, len(audio), batch_size):
        chunk = audio[start:start + batch_size]
        real = len(chunk)
        chunk = np.pad(chunk, ((0, batch_size - real), (0, 0)))  # one shape: one compilation
        out["latents"].append(np.asarray(vae.encode(chunk))[:real])
        out["semantic_tokens"].append(np.asarray(tokenizer(chunk))[:real])
        out["mulan_tokens"].append(np.asarray(mulan.audio_tokens(chunk))[:real])
    return {k: np.concatenate(v) for k, v in out.items()}


def tokenize_dataset(data_path: str, splits: list[str], out: str, stage_dirs: dict[str, str], crop_seconds: float,
                     batch_size: int, mesh: jax.sharding.Mesh, rules: Rules) -> dict[str, dict[str, np.ndarray]]:
    """Runs the frozen VAE encoder, SSL + k-means and MuLan + RVQ over each of the prepared dataset's
    `splits` and writes every crop's latents and tokens to the split's records in the cache folder
    `out` (each file atomically); returns each split's arrays.

    `stage_dirs` names the directories of "vae_gan", "ssl", "kmeans", "mulan" and "rvq".
    """
    from data_pipeline.token_records import write_records  # TensorFlow: only when used

    d = stage_dirs
    vae = FrozenVAE.load(d["vae_gan"], mesh, rules)
    tokenizer = SemanticTokenizer.load(d["kmeans"], d["ssl"], mesh, rules)
    mulan = FrozenMuLan.load(d["mulan"], d["rvq"], mesh, rules)
    if tokenizer.sample_rate != vae.sample_rate:
        raise ConfigError(f"the ssl stage works at {tokenizer.sample_rate} Hz, the vae_gan at {vae.sample_rate} Hz")
    crop = int(round(crop_seconds * vae.sample_rate))
    if crop % tokenizer.hop or crop % vae.hop:
        raise ConfigError(f"--crop_seconds={crop_seconds}: {crop} samples is not a whole number of semantic "
                          f"tokens ({tokenizer.hop} samples) and latent frames ({vae.hop} samples)")
    os.makedirs(out, exist_ok=True)
    written = {}
    for split in splits:
        clips = [x["audio"] for x in read_clips(data_path, split, vae.sample_rate)]
        written[split] = tokenize_clips(clips, vae, tokenizer, mulan, crop, batch_size)
        path = records_path(out, split)
        write_records(path + ".partial", written[split])
        os.replace(path + ".partial", path)
    return written
