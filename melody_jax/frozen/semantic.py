"""Semantic tokens (DESIGN §4.2): frozen SSL layer-l states → nearest k-means centroid.

The SSL tower is our wav2vec2-Conformer or a converted HuBERT/MERT (`models.hubert`, whose layer-l
frames are pooled to the token rate inside `hidden_states`); both give [B, N // hop, D].

`tokenize(model, layer, ssl_params, centroids, audio)` is pure and traceable, so a later stage can
run it inside its own jitted step; `SemanticTokenizer` binds model and layer (its `fn` is
`tokenize(ssl_params, centroids, audio)`) and its `__call__` is that function jit-compiled.
`SemanticTokenizer.load(kmeans_dir)` builds one from the kmeans stage's directory, whose config.json
names the layer and the ssl stage (`upstream.ssl`). 10 s at 24 kHz → 250 tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from melody_jax.frozen.checks import need
from melody_jax.frozen.loader import load_stage
from melody_jax.models.conformer import Wav2Vec2Conformer
from melody_jax.models.hubert import Hubert
from melody_jax.nn.kmeans import assign
from melody_jax.training.errors import WorkdirError
from melody_jax.training.sharding import DEFAULT_RULES, Rules, make_mesh


def resolve_layer(layer: int, num_layers: int) -> int:
    """-1 = the middle block (DESIGN §4.2 default); otherwise the 1-based block index (0 = projected features)."""
    return num_layers // 2 if layer < 0 else layer


SSLTower = Wav2Vec2Conformer | Hubert


def hidden_states(model: SSLTower, layer: int, ssl_params: Any, audio: jax.Array) -> jax.Array:
    return model.apply({"params": ssl_params}, audio, layer, method=type(model).hidden_states)


def tokenize(model: SSLTower, layer: int, ssl_params: Any, centroids: jax.Array,
             audio: jax.Array) -> jax.Array:
    """audio float32 [B, N] at the model's rate → int32 [B, N // hop] (hop 960: 25 tokens a second)."""
    return assign(hidden_states(model, layer, ssl_params, audio).astype(jnp.float32), centroids)


@dataclasses.dataclass(frozen=True)
class SemanticTokenizer:
    model: SSLTower
    layer: int
    ssl_params: Any
    centroids: jax.Array  # [K, D]
    sample_rate: int = 24000

    @classmethod
    def load(cls, kmeans_dir: str, ssl_dir: str | None = None, mesh: jax.sharding.Mesh | None = None,
             rules: Rules | None = None, *, fields: tuple[str, str] = ("kmeans", "ssl")) -> "SemanticTokenizer":
        """The frozen tokenizer of a kmeans stage (and the ssl stage its config names, unless given)."""
        mesh = mesh if mesh is not None else make_mesh({"data": -1})
        rules = rules if rules is not None else DEFAULT_RULES
        km = load_stage(kmeans_dir, "kmeans", mesh, rules, field=fields[0], keep=("centroids",))
        ssl = load_stage(ssl_dir or km.config.upstream.ssl, "ssl", mesh, rules, field=fields[1])
        layer = resolve_layer(km.config.model.layer, ssl.config.model.num_layers)
        centroids = km.params["centroids"]
        need(centroids.shape[1] == ssl.config.model.embed_dim, f"{kmeans_dir} holds {centroids.shape[1]}-d centroids "
             f"but the SSL model embeds to {ssl.config.model.embed_dim}", WorkdirError)
        return cls(ssl.model, layer, ssl.params, centroids, ssl.config.data.sample_rate)

    @property
    def fn(self) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """Pure `tokenize(ssl_params, centroids, audio) -> int32 [B, T_ST]` for use inside jitted code."""
        return functools.partial(tokenize, self.model, self.layer)

    @functools.cached_property
    def jitted(self) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        return jax.jit(self.fn)

    @property
    def hop(self) -> int:
        """Audio samples per token (960 at 24 kHz: 25 tokens a second)."""
        return self.model.hop

    @property
    def vocab_size(self) -> int:
        return int(self.centroids.shape[0])

    def num_tokens(self, num_samples: int) -> int:
        return num_samples // self.model.hop

    def __call__(self, audio: jax.Array) -> jax.Array:
        return self.jitted(self.ssl_params, self.centroids, audio)
