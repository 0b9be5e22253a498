"""One place a stage's network is built from its config: the module and an `init(rng)` of its params.

Tasks (`model`, `init_params`) and the frozen loader (abstract shapes to restore onto) call the same
builder, so a stored config and a training run always agree on the parameter tree. The fitted stages
(k-means, RVQ) have no module, only their arrays.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from melody_jax.audio.chroma import NUM_CHROMA
from melody_jax.models import codec, discriminators, vae_gan
from melody_jax.models.conformer import Wav2Vec2Conformer
from melody_jax.models.dpd import DPD
from melody_jax.models.hubert import Hubert
from melody_jax.models.mulan import MuLan
from melody_jax.models.musicgen_lm import MusicGenLM
from melody_jax.models.semantic_lm import SemanticLM
from melody_jax.models.transformer import DecoderLM
from melody_jax.nn.quantizers import VQ_COLLECTION
from melody_jax.models.codebook_patterns import Pattern, make_pattern
from melody_jax.training.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class StageModel:
    module: nn.Module | None  # None for the fitted stages (k-means, RVQ)
    init: Callable[[jax.Array], Any]  # rng → boxed params, laid out as the stage's checkpoints hold them


def crop_samples(config: ml_collections.ConfigDict) -> int:
    return int(round(config.data.crop_seconds * config.data.sample_rate))


def gan_params(init_generator: Callable[[jax.Array], dict[str, Any]], discriminator: nn.Module, crop: int,
               state_collections: tuple[str, ...], rng: jax.Array) -> dict[str, Any]:
    """A GAN stage's params: {"generator", "discriminator"} (+ "generator_state": its mutable collections)."""
    g_key, d_key = jax.random.split(rng)
    variables = dict(init_generator(g_key))
    params = {"generator": variables.pop("params"),
              "discriminator": discriminator.init(d_key, jnp.zeros((1, crop)))["params"]}
    if state_collections:
        params["generator_state"] = {c: variables[c] for c in state_collections}
    return params


def _gan(config, generator: nn.Module, state_collections: tuple[str, ...] = ()) -> StageModel:
    crop = crop_samples(config)
    init = lambda rng: gan_params(lambda k: generator.init(k, jnp.zeros((1, crop))),  # noqa: E731
                                  discriminators.build(config.discriminator), crop, state_collections, rng)
    return StageModel(generator, init)


def _vae_gan(config) -> StageModel:
    return _gan(config, vae_gan.build(config.model))


def _codec(config) -> StageModel:
    return _gan(config, codec.build(config.model), (VQ_COLLECTION,))


def ssl_model(config) -> Wav2Vec2Conformer:
    """HuBERT's target codebooks: one per `model.target_features` entry (iteration 1), one of the upstream's
    layer (iteration 2)."""
    m = config.model
    hubert = m.objective == "hubert"
    return Wav2Vec2Conformer(
        conv_channels=tuple(m.conv_channels), conv_strides=tuple(m.conv_strides), embed_dim=m.embed_dim,
        num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim, conv_kernel=m.conv_kernel,
        num_groups=m.num_groups, num_vars=m.num_vars, codevector_dim=m.codevector_dim, final_dim=m.final_dim,
        dropout=m.dropout, mask_prob=m.mask_prob, mask_length=m.mask_length, normalize_audio=m.normalize_audio,
        dtype=jnp.dtype(m.dtype), remat=m.remat, scan_layers=m.get("scan_layers", False),
        num_targets=m.num_targets if hubert else 0, conv_norm=m.get("conv_norm", "layer"),
        num_codebooks=(1 if config.upstream.ssl else len(m.target_features)) if hubert else 1)


def hubert_model(config) -> Hubert:
    """A converted HuBERT/MERT (`model.arch = "hubert"`, convert/hf_hubert.py) taking `data.sample_rate` audio."""
    m = config.model
    return Hubert(conv_channels=tuple(m.conv_channels), conv_kernels=tuple(m.conv_kernels),
                  conv_strides=tuple(m.conv_strides), conv_bias=m.conv_bias, feature_norm=m.feature_norm,
                  embed_dim=m.embed_dim, num_layers=m.num_layers, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                  pos_kernel=m.pos_kernel, pos_groups=m.pos_groups, stable_layer_norm=m.stable_layer_norm,
                  residual_scale=m.residual_scale, layer_norm_eps=m.layer_norm_eps, normalize_audio=m.normalize_audio,
                  model_rate=m.model_rate, input_rate=config.data.sample_rate, token_hop=m.token_hop,
                  dtype=jnp.dtype(m.dtype))


def ssl_tower(config) -> Wav2Vec2Conformer | Hubert:
    """The ssl stage's network: our Conformer, or a converted HuBERT-family tower (frozen only)."""
    return hubert_model(config) if config.model.get("arch") == "hubert" else ssl_model(config)


def _ssl(config) -> StageModel:
    if config.model.get("arch") == "hubert":
        tower = hubert_model(config)
        return StageModel(tower, lambda rng: tower.init(rng, jnp.zeros((1, tower.model_rate)))["params"])
    model, audio = ssl_model(config), jnp.zeros((1, crop_samples(config)))

    def init(rng):
        k1, k2, k3 = jax.random.split(rng, 3)
        return model.init({"params": k1, "mask": k2, "gumbel": k3}, audio, train=False)["params"]

    return StageModel(model, init)


def mulan_model(model_config, sample_rate: int) -> MuLan:
    m = model_config
    return MuLan(sample_rate=sample_rate, n_fft=m.n_fft, hop_length=m.hop_length, n_mels=m.n_mels,
                 patch_frames=m.patch_frames, patch_mels=m.patch_mels, audio_layers=m.audio_layers,
                 text_layers=m.text_layers, embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                 out_dim=m.out_dim, frequency_scale=m.get("frequency_scale", "mel"), fmin=m.get("fmin", 0.0),
                 tempo_lags=m.get("tempo_lags", 0), chroma_profile=m.get("chroma_profile", False),
                 dtype=jnp.dtype(m.dtype), remat=m.remat, scan_layers=m.get("scan_layers", False))


def _mulan(config) -> StageModel:
    model, length = mulan_model(config.model, config.data.sample_rate), config.model.max_text_length
    init = lambda rng: model.init(rng, jnp.zeros((1, crop_samples(config))),  # noqa: E731
                                  jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), bool))["params"]
    return StageModel(model, init)


def _kmeans(config) -> StageModel:
    m = config.model
    return StageModel(None, lambda rng: {
        "centroids": nn.LogicallyPartitioned(jnp.zeros((m.num_clusters, m.embed_dim)), ("vocab", None)),
        "counts": nn.LogicallyPartitioned(jnp.zeros((m.num_clusters,)), ("vocab",))})


def _rvq(config) -> StageModel:
    m = config.model
    zeros = lambda: jnp.zeros((m.num_quantizers, m.codebook_size, m.embed_dim), jnp.float32)  # noqa: E731
    return StageModel(None, lambda rng: {"codebooks": nn.LogicallyPartitioned(zeros(), (None, "vocab", None))})


def _semantic_lm(config) -> StageModel:
    m = config.model
    model = SemanticLM(num_layers=m.num_layers, embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
                       num_prefix=m.num_mulan_tokens, prefix_codebook_size=m.mulan_codebook_size,
                       vocab_size=m.semantic_vocab_size, dtype=jnp.dtype(m.dtype), remat=m.remat,
                       scan_layers=m.get("scan_layers", False), attention_impl=m.get("attention_impl", "xla"),
                       null_prefix=m.get("cfg_dropout", 0.0) > 0)
    length = m.num_mulan_tokens + config.data.semantic_len - 1
    return StageModel(model, lambda rng: model.init(rng, jnp.zeros((1, length), jnp.int32))["params"])


def _dpd(config) -> StageModel:
    m = config.model
    model = DPD(latent_dim=m.latent_dim, hidden_dim=m.hidden_dim, num_blocks=m.num_blocks,
                segment_length=m.segment_length, merge_lengths=tuple(m.merge_lengths) or None,
                num_heads=m.num_heads, roformer_layers=m.roformer_layers, mlp_dim=m.mlp_dim,
                angle_dim=m.angle_dim, vocab_size=m.vocab_size, align_tokens=m.align_tokens,
                parallel_sru=m.parallel_sru, remat=m.remat, dtype=jnp.dtype(m.dtype),
                scan_layers=m.get("scan_layers", False), input_scale=m.get("input_scale", 1.0))

    return StageModel(model, lambda rng: dpd_params(model, config, rng))


def dpd_params(model: nn.Module, config, rng: jax.Array) -> Any:
    """Params of a DPD-shaped velocity network (the DPD, or an ablation's stand-in) at the config's sizes."""
    d = config.data
    z = jnp.zeros((1, d.latent_length, config.model.latent_dim))
    return model.init(rng, z, jnp.zeros(z.shape[:2]), jnp.zeros((1, d.token_length), jnp.int32))["params"]


ARCHITECTURE = {"norm": "rms", "positions": "rotary", "mlp_bias": True, "text_encoder": "bytes", "text_vocab_size": 0,
                "text_head_dim": 0, "text_proj": False, "melody_mode": "prefix",
                "scan_layers": False}  # configs saved before these: defaults


def musicgen_model(model_config) -> MusicGenLM:
    m = model_config
    options = {k: m.get(k, default) for k, default in ARCHITECTURE.items()}
    prepend = m.use_melody and options["melody_mode"] == "prepend"
    return MusicGenLM(num_codebooks=m.num_codebooks, codebook_size=m.codebook_size, num_layers=m.num_layers,
                      embed_dim=m.embed_dim, num_heads=m.num_heads, mlp_dim=m.mlp_dim, text_layers=m.text_layers,
                      text_embed_dim=m.text_embed_dim, text_heads=m.text_heads, text_mlp_dim=m.text_mlp_dim,
                      use_melody=m.use_melody, dtype=jnp.dtype(m.dtype), remat=m.remat,
                      melody_frames=m.melody_frames if prepend else 0, **options)


PATTERN_OPTIONS = ("flattening", "flatten_first", "empty_initial", "group_by")


def musicgen_pattern(model_config) -> Pattern:
    """The configured pattern; options a config predating them lacks read as None (the default)."""
    m = model_config
    return make_pattern(m.pattern, m.num_codebooks, m.delays, **{k: m.get(k) for k in PATTERN_OPTIONS})


def musicgen_example_inputs(config, batch: int = 1) -> tuple[jax.Array, ...]:
    """Zero inputs of the training shapes: (seq, text_tokens, text_mask, chroma or None)."""
    m = config.model
    seq = jnp.zeros((batch, m.num_codebooks, musicgen_pattern(m).num_steps(config.data.frames)), jnp.int32)
    tokens = jnp.zeros((batch, m.max_text_length), jnp.int32)
    chroma = jnp.zeros((batch, m.melody_frames, NUM_CHROMA), jnp.float32) if m.use_melody else None
    return seq, tokens, tokens > 0, chroma


def _musicgen(config) -> StageModel:
    model = musicgen_model(config.model)
    return StageModel(model, lambda rng: model.init(rng, *musicgen_example_inputs(config))["params"])


def _toy_lm(config) -> StageModel:
    m = config.model
    model = DecoderLM(vocab_size=m.vocab_size, num_layers=m.num_layers, embed_dim=m.embed_dim,
                      num_heads=m.num_heads, mlp_dim=m.mlp_dim, dtype=jnp.dtype(m.dtype), remat=m.remat,
                      scan_layers=m.get("scan_layers", False), attention_impl=m.get("attention_impl", "xla"))
    return StageModel(model, lambda rng: model.init(rng, jnp.zeros((1, config.data.seq_len), jnp.int32))["params"])


BUILDERS: dict[str, Callable[[ml_collections.ConfigDict], StageModel]] = {
    "vae_gan": _vae_gan, "codec": _codec, "ssl": _ssl, "mulan": _mulan, "kmeans": _kmeans, "rvq": _rvq,
    "semantic_lm": _semantic_lm, "dpd": _dpd, "musicgen": _musicgen, "toy_lm": _toy_lm}


def build_model(config: ml_collections.ConfigDict) -> StageModel:
    """The network of `config.stage` as `config` describes it."""
    stage = config.get("stage")
    if stage not in BUILDERS:
        raise ConfigError(f"config.stage={stage!r} has no model builder; known: {sorted(BUILDERS)}")
    return BUILDERS[stage](config)
