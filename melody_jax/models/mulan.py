"""MuLan (DESIGN §4.3): an audio tower and a text tower into one 128-d L2-normalised space.

No pretrained AST/BERT can be downloaded here, so both towers are small pre-norm transformer
encoders trained from scratch [choice]:
- audio: log-mel (or log semitone bands: `frequency_scale`) → (patch_frames × patch_mels) patches → linear
  → + a learned embedding of the patch's band (+ with `tempo_lags`, a projection of the clip's onset
  autocorrelation; + with `chroma_profile`, one of its pitch-class profile) → bidirectional rotary attention over
  the patches (rotary position = the patch's time index, so any clip length works) → mean pool → projection
  (AST-like);
- text: byte tokens (`melody_jax.text.byte_tokenizer`) → embedding → encoder with a padding mask →
  masked mean pool → projection.
Training is the symmetric InfoNCE of CLIP/MuLan over the global batch with a learned temperature.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from melody_jax.audio.mel import log_mel_spectrogram, semitone_filterbank
from melody_jax.audio.stft import magnitude, spectral_flux, stft
from melody_jax.nn.attention import Attention, padding_mask
from melody_jax.nn.init import dense
from melody_jax.nn.mlp import GeluMLP
from melody_jax.nn.norms import RMSNorm
from melody_jax.nn.kmeans import assign
from melody_jax.nn.scan import layer_stack
from melody_jax.text.byte_tokenizer import VOCAB_SIZE

MAX_LOG_SCALE = math.log(100.0)  # CLIP's clip: logits at most 100 × cosine
INIT_LOG_SCALE = math.log(1.0 / 0.07)
NEG_LOGIT = -1e9  # a left-out negative's logit
LOG_MEL_SHIFT, LOG_MEL_SCALE = 5.0, 4.0  # natural-log mel ∈ [log 1e-5, ~3] → roughly unit range
LOG_FLOOR = 1e-5
# "mel": n_mels mel bands from fmin (the lower edge). "semitone": n_mels bands a semitone apart, the lowest centred
# at fmin (audio.mel.semitone_filterbank): the mel scale merges neighbouring semitones below ~1 kHz, so a tower
# hearing mel bands cannot tell a key, and its text tower then has nothing to tie "in D minor" to.
FREQUENCY_SCALES = ("mel", "semitone")


class EncoderBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None, positions: jax.Array) -> jax.Array:
        h = RMSNorm(dtype=self.dtype, name="attn_norm")(x)
        x = x + Attention(self.num_heads, dtype=self.dtype, name="attn")(h, mask=mask, positions=positions)
        h = RMSNorm(dtype=self.dtype, name="mlp_norm")(x)
        x = x + GeluMLP(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class Encoder(nn.Module):
    """Pre-norm bidirectional blocks, then masked mean pool and a projection to the shared space.

    `pool=False` returns the normed sequence [B, T, D] instead (MusicGen's text encoder, §6).
    `scan_layers`: the blocks as one `nn.scan` over parameters stacked on a `layers` axis.
    """

    num_layers: int
    num_heads: int
    mlp_dim: int
    out_dim: int
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    pool: bool = True
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, positions: jax.Array) -> jax.Array:
        mask = padding_mask(valid)
        if self.scan_layers:
            stack = layer_stack(EncoderBlock, self.num_layers, 2, self.remat)
            x, _ = stack(self.num_heads, self.mlp_dim, self.dtype, name="layers")(x, mask, positions)
        else:
            block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
            for i in range(self.num_layers):
                x = block(self.num_heads, self.mlp_dim, self.dtype, name=f"layer_{i}")(x, mask, positions)
        x = RMSNorm(dtype=self.dtype, name="final_norm")(x).astype(jnp.float32)
        if not self.pool:
            return nn.with_logical_constraint(x, ("batch", "length", "embed"))
        w = valid.astype(jnp.float32)[..., None]
        pooled = (x * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
        out = dense(self.out_dim, ("embed", None), name="proj")(pooled)
        return nn.with_logical_constraint(l2_normalize(out), ("batch", None))


class MuLan(nn.Module):
    """`embed_audio(audio [B, T]) → [B, out_dim]`, `embed_text(tokens, mask) → [B, out_dim]`, unit norm."""

    sample_rate: int
    n_fft: int
    hop_length: int
    n_mels: int
    patch_frames: int
    patch_mels: int
    audio_layers: int
    text_layers: int
    embed_dim: int
    num_heads: int
    mlp_dim: int
    out_dim: int = 128
    frequency_scale: str = "mel"  # FREQUENCY_SCALES
    fmin: float = 0.0
    # > 0: every patch also gets a projection of the autocorrelation of the clip's onset envelope at lags 1..tempo_lags
    # frames (not in the paper). Patches of patch_frames frames place a beat only to a patch; the autocorrelation
    # places its period to a frame (at hop 256 and 24 kHz, 120 BPM is 47 frames: 5 % is 2.3 of them).
    tempo_lags: int = 0
    # True (semitone bands only): every patch also gets a projection of the clip's pitch-class profile, the log of
    # each class's power over the real frames and octaves, standardised over the 12 classes (not in the paper). A
    # key is a statistic of the whole clip that no single patch holds; with a linear projection, a caption's
    # similarity to the clip can correlate the profile with a learned key template, as a Krumhansl-Schmuckler key
    # finder does.
    chroma_profile: bool = False
    dtype: jnp.dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False  # Encoder.scan_layers, both towers

    def setup(self):
        tower = functools.partial(Encoder, num_heads=self.num_heads, mlp_dim=self.mlp_dim, out_dim=self.out_dim,
                                  dtype=self.dtype, remat=self.remat, scan_layers=self.scan_layers)
        self.audio_encoder = tower(self.audio_layers)
        self.text_encoder = tower(self.text_layers)
        self.patch_proj = dense(self.embed_dim, (None, "embed"), self.dtype, use_bias=True)
        self.band_embedding = self.param("band_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (self.n_mels // self.patch_mels, self.embed_dim))
        self.token_embedding = self.param("token_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("vocab", "embed")), (VOCAB_SIZE, self.embed_dim))
        if self.tempo_lags:
            self.tempo_proj = dense(self.embed_dim, (None, "embed"), self.dtype, use_bias=True)
        if self.chroma_profile:
            self.chroma_proj = dense(self.embed_dim, (None, "embed"), self.dtype, use_bias=True)
        self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
            nn.initializers.constant(INIT_LOG_SCALE), ()), ())

    def bands(self, audio: jax.Array) -> jax.Array:
        """audio [B, T] → normalised log-band spectrogram [B, frames, n_mels]."""
        audio = audio.astype(jnp.float32)
        if self.frequency_scale == "semitone":
            power = jnp.square(magnitude(stft(audio, self.n_fft, self.hop_length)))
            filters = semitone_filterbank(self.sample_rate, self.n_fft, self.n_mels, self.fmin)
            mel = jnp.log(jnp.maximum(power @ filters, LOG_FLOOR))
        else:
            mel = log_mel_spectrogram(audio, self.sample_rate, self.n_fft, self.hop_length, self.n_mels,
                                      fmin=self.fmin, floor=LOG_FLOOR)
        return (mel + LOG_MEL_SHIFT) / LOG_MEL_SCALE

    def patches(self, mel: jax.Array) -> jax.Array:
        """bands [B, frames, n_mels] → patches [B, time patches, band groups, patch_frames · patch_mels]."""
        b, frames, _ = mel.shape
        t, f = frames // self.patch_frames, self.n_mels // self.patch_mels
        if t == 0:
            raise ValueError(f"audio of {frames} STFT frames is shorter than one patch "
                             f"({self.patch_frames} frames of hop {self.hop_length})")
        mel = mel[:, : t * self.patch_frames].reshape(b, t, self.patch_frames, f, self.patch_mels)
        return mel.transpose(0, 1, 3, 2, 4).reshape(b, t, f, self.patch_frames * self.patch_mels)

    def embed_audio(self, audio: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Unit embeddings [B, out_dim]; with a sample mask the tower attends to and pools the valid
        patches only (all of them where a row has none)."""
        mel = self.bands(audio)
        p = self.patches(mel)
        b, t, f, _ = p.shape
        x = self.patch_proj(p) + self.band_embedding.astype(self.dtype)
        frames = jnp.ones(mel.shape[:2], bool) if mask is None else valid_frames(self, mask, mel.shape[1], 1)
        if self.tempo_lags:
            x = x + self.tempo_proj(onset_autocorrelation(mel, frames, self.tempo_lags))[:, None, None, :]
        if self.chroma_profile:
            x = x + self.chroma_proj(pitch_class_profile(mel, frames))[:, None, None, :]
        x = nn.with_logical_constraint(x.reshape(b, t * f, self.embed_dim), ("batch", "length", "embed"))
        positions = jnp.repeat(jnp.arange(t), f)
        valid = jnp.ones((b, t), bool)
        if mask is not None:
            patches = valid_frames(self, mask, t, self.patch_frames)
            valid = patches | ~patches.any(-1, keepdims=True)
        return self.audio_encoder(x, jnp.repeat(valid, f, axis=1), positions)

    def embed_text(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        x = jnp.take(self.token_embedding, tokens, axis=0).astype(self.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return self.text_encoder(x, mask.astype(bool), jnp.arange(tokens.shape[1]))

    def __call__(self, audio: jax.Array, tokens: jax.Array, mask: jax.Array, audio_mask: jax.Array | None = None):
        """(audio embeddings, text embeddings, clipped log logit scale)."""
        return (self.embed_audio(audio, audio_mask), self.embed_text(tokens, mask),
                jnp.clip(self.log_scale, 0.0, MAX_LOG_SCALE))


def valid_frames(model: MuLan, mask: jax.Array, num: int, frames_per: int) -> jax.Array:
    """bool [B, num] from a prefix sample mask [B, T]: which of `num` runs of `frames_per` STFT frames (patches,
    or frames with 1) are real. In a padded row a run counts when every STFT window of its frames ends inside the
    real samples; a row without padding keeps every run, as unmasked inference does. A padded clip then pools the
    patches of the clip cut to its length whenever the cut clip's last STFT window ends inside it (else the cut
    clip also keeps its reflect-padded edge)."""
    real = jnp.asarray(mask, jnp.float32).sum(-1, keepdims=True)
    last_frame = (jnp.arange(num) + 1) * frames_per - 1
    return (last_frame * model.hop_length + model.n_fft - model.n_fft // 2 <= real) | (real >= mask.shape[-1])


def onset_autocorrelation(bands: jax.Array, valid: jax.Array, lags: int) -> jax.Array:
    """bands [B, frames, n] (log power) and valid frames [B, frames] → [B, lags]: the autocorrelation of the
    band-mean spectral flux (the onset envelope beat trackers follow) at lags 1..lags frames, over the valid
    frames, centred and divided by its lag-0 value, so a beat's period shows as a peak whatever the level."""
    w = valid.astype(jnp.float32)
    flux = spectral_flux(bands.astype(jnp.float32)).mean(-1) * w
    count = jnp.maximum(w.sum(-1, keepdims=True), 1.0)
    envelope = (flux - flux.sum(-1, keepdims=True) / count) * w
    n = 2 * envelope.shape[1]  # zero-padded: a linear, not circular, correlation
    spectrum = jnp.fft.rfft(envelope, n)
    ac = jnp.fft.irfft(spectrum * jnp.conj(spectrum), n)
    return ac[:, 1: lags + 1] / jnp.maximum(ac[:, :1], 1e-8)


def pitch_class_profile(bands: jax.Array, valid: jax.Array) -> jax.Array:
    """The tower's semitone bands [B, frames, 12·k] and valid frames [B, frames] → [B, 12]: the log of each pitch
    class's power summed over the valid frames and the k octaves (class i: every 12th band from band i), standardised
    over the classes, so a transposition by s semitones rolls it by s whatever the level. Power, not the log bands'
    mean: a band a tone leaks into weighs its leaked power, not a log step above the floor."""
    power = jnp.exp(bands.astype(jnp.float32) * LOG_MEL_SCALE - LOG_MEL_SHIFT) * valid.astype(jnp.float32)[..., None]
    total = power.sum(1)
    profile = jnp.log(total.reshape(total.shape[0], -1, 12).sum(1) + LOG_FLOOR)
    profile = profile - profile.mean(-1, keepdims=True)
    return profile / jnp.sqrt(jnp.mean(jnp.square(profile), -1, keepdims=True) + 1e-6)


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def similarity(text_emb: jax.Array, audio_emb: jax.Array, log_scale: jax.Array) -> jax.Array:
    """[B_text, B_audio] logits exp(log_scale) · cosine over the whole (global) batch."""
    sims = jnp.matmul(text_emb, audio_emb.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.exp(log_scale) * sims


def contrastive_loss(text_emb: jax.Array, audio_emb: jax.Array, log_scale: jax.Array,
                     negatives: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array]:
    """(symmetric InfoNCE, [B, B] logits): row i's positive is column i, both directions averaged.
    `negatives` (text embeddings [N, D], valid [N]): more texts every audio row is scored against, in the audio →
    text direction (NegCLIP's hard negatives); invalid ones are left out."""
    logits = similarity(text_emb, audio_emb, log_scale)
    labels = jnp.arange(logits.shape[0])
    audio_logits = logits.T
    if negatives is not None:
        emb, valid = negatives
        extra = similarity(emb, audio_emb, log_scale).T
        audio_logits = jnp.concatenate([audio_logits, jnp.where(valid[None, :], extra, NEG_LOGIT)], -1)
    loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
                  + optax.softmax_cross_entropy_with_integer_labels(audio_logits, labels).mean())
    return loss, logits


@functools.partial(jax.jit, static_argnums=0)
def embed_audio(model: MuLan, params, audio: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[B, T] audio at `model.sample_rate` (and its sample mask) → [B, out_dim] unit vectors."""
    return model.apply({"params": params}, audio, mask, method=MuLan.embed_audio)


@functools.partial(jax.jit, static_argnums=0)
def embed_text(model: MuLan, params, text_tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Byte tokens [B, L] and their mask → [B, out_dim] unit vectors."""
    return model.apply({"params": params}, text_tokens, mask, method=MuLan.embed_text)


def rvq_levels(codebooks: jax.Array, embedding: jax.Array):
    """Scans the residual through codebooks [Q, K, D]: (codes [Q, B], quantized parts [Q, B, D])."""
    def level(residual, codebook):
        codes = assign(residual, codebook)
        part = codebook[codes]
        return residual - part, (codes, part)

    return jax.lax.scan(level, jnp.asarray(embedding, jnp.float32), codebooks)[1]


@jax.jit
def mulan_tokens(codebooks: jax.Array, embedding: jax.Array) -> jax.Array:
    """RVQ codes int32 [B, Q] of embeddings [B, D] under codebooks [Q, K, D] (the LM's prefix)."""
    return rvq_levels(codebooks, embedding)[0].T


@jax.jit
def dequantize(codebooks: jax.Array, tokens: jax.Array) -> jax.Array:
    """int [B, q] → [B, D]: the sum of the first q levels' codebook rows."""
    rows = jax.vmap(lambda cb, c: cb[c])(codebooks[: tokens.shape[1]], tokens.T)
    return rows.sum(0)
