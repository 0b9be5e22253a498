"""Semantic tokens (DESIGN §4.2): frozen wav2vec2-Conformer layer-l states → nearest k-means centroid.

`tokenize(model, layer, ssl_params, centroids, audio)` is pure and traceable, so a later stage can
run it inside its own jitted step; `SemanticTokenizer` binds model and layer (its `fn` is
`tokenize(ssl_params, centroids, audio)`) and its `__call__` is that function jit-compiled.
`load_semantic_tokenizer(kmeans_workdir)` builds one from the kmeans stage's workdir, which names
the ssl workdir and the layer in its config.json. 10 s at 24 kHz → 250 tokens.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from melody_jax.models.conformer import Wav2Vec2Conformer
from melody_jax.tokenizers.kmeans import assign
from melody_jax.training import config as config_lib
from melody_jax.training.checkpoint import Checkpointer, check_compatible, param_signature
from melody_jax.training.errors import WorkdirError
from melody_jax.training.sharding import DEFAULT_RULES, activate, make_mesh


def resolve_layer(layer: int, num_layers: int) -> int:
    """-1 = the middle block (DESIGN §4.2 default); otherwise the 1-based block index (0 = projected features)."""
    return num_layers // 2 if layer < 0 else layer


def read_config(workdir: str, field: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise WorkdirError(f"config.{field}={workdir!r} has no config.json (train that stage there first)")
    with open(path) as f:
        return config_lib.from_json(f.read())


def load_ssl(ssl_workdir: str, mesh: jax.sharding.Mesh, rules, field: str = "model.ssl_workdir"):
    """(the SSL task as configured there, its latest parameters restored sharded onto `mesh`)."""
    from melody_jax.tasks.ssl import SSLTask
    from melody_jax.training.loop import sharded_abstract_state  # the loop imports the task registry

    task = SSLTask(read_config(ssl_workdir, field))
    ckpt = Checkpointer(ssl_workdir, keep=1, every=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise WorkdirError(f"config.{field}={ssl_workdir!r} holds no checkpoint")
        with activate(mesh, rules):
            abstract, _ = sharded_abstract_state(task, mesh, rules, jax.random.key(0))
        check_compatible(ckpt.read_meta(step), "ssl", param_signature(abstract.params), ssl_workdir)
        state, _ = ckpt.restore(step, abstract)
    finally:
        ckpt.close()
    return task, state.params


def hidden_states(model: Wav2Vec2Conformer, layer: int, ssl_params: Any, audio: jax.Array) -> jax.Array:
    return model.apply({"params": ssl_params}, audio, layer, method=Wav2Vec2Conformer.hidden_states)


def tokenize(model: Wav2Vec2Conformer, layer: int, ssl_params: Any, centroids: jax.Array,
             audio: jax.Array) -> jax.Array:
    """audio float32 [B, N] at the model's rate → int32 [B, N // hop] (hop 960: 25 tokens a second)."""
    return assign(hidden_states(model, layer, ssl_params, audio).astype(jnp.float32), centroids)


@dataclasses.dataclass(frozen=True)
class SemanticTokenizer:
    model: Wav2Vec2Conformer
    layer: int
    ssl_params: Any
    centroids: jax.Array  # [K, D]
    sample_rate: int = 24000

    @property
    def fn(self) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        """Pure `tokenize(ssl_params, centroids, audio) -> int32 [B, T_ST]` for use inside jitted code."""
        return functools.partial(tokenize, self.model, self.layer)

    @functools.cached_property
    def jitted(self) -> Callable[[Any, jax.Array, jax.Array], jax.Array]:
        return jax.jit(self.fn)

    @property
    def vocab_size(self) -> int:
        return int(self.centroids.shape[0])

    def num_tokens(self, num_samples: int) -> int:
        return num_samples // self.model.hop

    def __call__(self, audio: jax.Array) -> jax.Array:
        return self.jitted(self.ssl_params, self.centroids, audio)


def load_centroids(kmeans_workdir: str) -> jax.Array:
    """[K, D] centroids of the kmeans stage's latest checkpoint (replicated)."""
    ckpt = Checkpointer(kmeans_workdir, keep=1, every=1)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise WorkdirError(f"{kmeans_workdir} holds no kmeans checkpoint")
        stage = ckpt.read_meta(step).get("stage")
        if stage != "kmeans":
            raise WorkdirError(f"{kmeans_workdir} holds a checkpoint of stage {stage!r}, not 'kmeans'")
        state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    finally:
        ckpt.close()
    return jnp.asarray(state["params"]["centroids"])


def load_semantic_tokenizer(kmeans_workdir: str, ssl_workdir: str | None = None,
                            mesh: jax.sharding.Mesh | None = None, rules=None) -> SemanticTokenizer:
    """The frozen tokenizer of a kmeans workdir (and the ssl workdir its config names, unless given)."""
    kconfig = read_config(kmeans_workdir, "kmeans_workdir")
    mesh = mesh if mesh is not None else make_mesh({"data": -1})
    rules = rules if rules is not None else DEFAULT_RULES
    task, params = load_ssl(ssl_workdir or kconfig.model.ssl_workdir, mesh, rules)
    layer = resolve_layer(kconfig.model.layer, task.config.model.num_layers)
    centroids = load_centroids(kmeans_workdir)
    if centroids.shape[1] != task.config.model.embed_dim:
        raise WorkdirError(f"{kmeans_workdir} holds {centroids.shape[1]}-d centroids but the SSL model embeds to "
                           f"{task.config.model.embed_dim}")
    return SemanticTokenizer(task.model, layer, params, centroids, task.config.data.sample_rate)
