"""Vector quantization: VQ and residual VQ (RVQ) as Linen modules (k-means: `melody_jax.nn.kmeans`).

Shared by MuLan's conditioning RVQ (12 × 1024 over 128-d, fitted after training by the rvq stage,
§4.3) and the MusicGen codec (4 × 2048, trained with EMA codebooks, k-means init
from the first batch and dead-code re-seeding, §6).

Codebooks are learned by EMA / k-means, never by gradients, so each codebook lives with its
statistics in the mutable collection `"vq_stats"` (`VQ_COLLECTION`), not in `"params"`: the
optimizer (and weight decay) never touch it. Per level it holds `codebook [K, D]`,
`cluster_size [K]` (EMA of assignment counts), `embed_sum [K, D]` (EMA of assigned vectors; with
Laplace smoothing `codebook = embed_sum / cluster_size`) and `initialized` (k-means init done).
Updates need `mutable=["vq_stats"]` and an `rngs={"vq": key}` stream (`VQ_RNG`).

Matmuls run at `Precision.HIGHEST`: TPU/GPU default float32 matmuls drop to bf16/TF32, enough to
flip near-tied assignments and bias the EMA sums.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.nn.kmeans import assign, kmeans

VQ_COLLECTION = "vq_stats"
VQ_RNG = "vq"
_HIGHEST = jax.lax.Precision.HIGHEST


def _counts_and_sums(x: jax.Array, codes: jax.Array, num_codes: int) -> tuple[jax.Array, jax.Array]:
    """Per-code assignment counts `[K]` and sums of assigned vectors `[K, D]` (a one-hot matmul)."""
    onehot = jax.nn.one_hot(codes, num_codes, dtype=jnp.float32)
    return onehot.sum(0), jnp.matmul(onehot.T, x, precision=_HIGHEST)


def perplexity(counts: jax.Array) -> jax.Array:
    """exp(entropy) of code histograms or distributions along the last axis: the effective number of
    codes in use (K at best)."""
    p = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1))


@flax.struct.dataclass
class QuantizerOutput:
    """What a quantizer call returns. Per-level metrics are scalars for VQ and `[n_q]` for RVQ."""

    quantized: jax.Array  # x's shape and dtype; straight-through: forward = codes, gradient = identity
    codes: jax.Array  # int32 [...] (VQ) or [..., n_q] (RVQ)
    commitment_loss: jax.Array  # mean ||x − sg(q)||² (averaged over RVQ levels); weight it in the task
    perplexity: jax.Array  # effective number of codes used in this batch
    usage: jax.Array  # fraction of the codebook used in this batch
    dead_codes: jax.Array  # codes re-seeded by this update (0 without update)


class VectorQuantizer(nn.Module):
    """One EMA codebook of `codebook_size` × `dim` (defaults: audiocraft's codec quantizer).

    `quantize(x, update=True)` (needs `mutable=["vq_stats"]`, `rngs={"vq": key}`): on the first
    update, if `kmeans_init`, the codebook is fitted by k-means to the batch; then every update
    moves each code to the EMA mean of its assigned inputs (`decay`, Laplace smoothing `epsilon`)
    and re-seeds codes whose EMA usage fell below `dead_code_threshold` with random current inputs.
    Outputs are computed with the codebook as it was before the update.
    """

    codebook_size: int
    dim: int
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 2.0
    kmeans_init: bool = True
    kmeans_iters: int = 50

    def setup(self):
        k, d = self.codebook_size, self.dim
        self.codebook = self.variable(
            VQ_COLLECTION, "codebook",
            nn.with_logical_partitioning(
                lambda: jax.random.normal(self.make_rng("params"), (k, d), jnp.float32), ("vocab", "embed")
            ),
        )
        # Fresh codes start at `_fresh_size` observations of themselves (embed_sum = size · codebook).
        self.cluster_size = self.variable(
            VQ_COLLECTION, "cluster_size",
            nn.with_logical_partitioning(lambda: jnp.full((k,), self._fresh_size, jnp.float32), ("vocab",)),
        )
        self.embed_sum = self.variable(
            VQ_COLLECTION, "embed_sum",
            nn.with_logical_partitioning(lambda: self._fresh_size * self.codebook.value, ("vocab", "embed")),
        )
        self.initialized = self.variable(VQ_COLLECTION, "initialized", lambda: jnp.asarray(not self.kmeans_init))

    @property
    def _fresh_size(self) -> float:
        """EMA count given to a just-placed (initial, fitted or re-seeded) code: it survives the next
        update only if it then gets at least `dead_code_threshold` inputs (≥ 1 so it is never 0)."""
        return max(self.dead_code_threshold, 1.0)

    def __call__(self, x: jax.Array, *, update: bool = False) -> QuantizerOutput:
        return self.quantize(x, update=update)

    def encode(self, x: jax.Array) -> jax.Array:
        """`[..., D]` → `int32 [...]` nearest-code indices."""
        flat = jnp.asarray(x, jnp.float32).reshape(-1, self.dim)
        return assign(flat, self.codebook.value).reshape(x.shape[:-1])

    def decode(self, codes: jax.Array) -> jax.Array:
        """`int [...]` → `float32 [..., D]` codebook rows."""
        return jnp.take(self.codebook.value, codes, axis=0)

    def set_codebook(self, codebook: jax.Array) -> None:
        """Installs a fitted codebook `[K, D]` (e.g. fitted by `nn.kmeans.kmeans`) and skips k-means init."""
        codebook = jnp.asarray(codebook, jnp.float32)
        self.codebook.value = codebook
        self.cluster_size.value = jnp.full((self.codebook_size,), self._fresh_size, jnp.float32)
        self.embed_sum.value = self._fresh_size * codebook
        self.initialized.value = jnp.asarray(True)

    def quantize(self, x: jax.Array, *, update: bool = False) -> QuantizerOutput:
        """Nearest codes of `x [..., dim]`, straight-through output, commitment loss, usage metrics."""
        flat = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32).reshape(-1, self.dim))
        updating = update and not self.is_initializing()
        if updating and self.kmeans_init:
            self._init_from_batch(flat, self.make_rng(VQ_RNG))
        codebook = self.codebook.value
        codes = assign(flat, codebook)
        counts, sums = _counts_and_sums(flat, codes, self.codebook_size)  # unused sums: XLA drops them
        dead = jnp.zeros((), jnp.int32)
        if updating:
            dead = self._ema_update(flat, counts, sums, self.make_rng(VQ_RNG))
        quantized = codebook[codes].reshape(x.shape)
        x32 = jnp.asarray(x, jnp.float32)
        return QuantizerOutput(
            quantized=(x32 + jax.lax.stop_gradient(quantized - x32)).astype(x.dtype),
            codes=codes.reshape(x.shape[:-1]),
            commitment_loss=jnp.mean((x32 - jax.lax.stop_gradient(quantized)) ** 2),
            perplexity=perplexity(counts),
            usage=jnp.mean(counts > 0),
            dead_codes=dead,
        )

    def _init_from_batch(self, flat: jax.Array, key: jax.Array) -> None:
        def fit(_):
            codebook = kmeans(flat, self.codebook_size, key, self.kmeans_iters)
            counts, _ = _counts_and_sums(flat, assign(flat, codebook), self.codebook_size)
            return codebook, counts, codebook * counts[:, None]

        current = (self.codebook.value, self.cluster_size.value, self.embed_sum.value)
        new = jax.lax.cond(self.initialized.value, lambda state: state, fit, current)
        self.codebook.value, self.cluster_size.value, self.embed_sum.value = new
        self.initialized.value = jnp.asarray(True)

    def _ema_update(self, flat: jax.Array, counts: jax.Array, sums: jax.Array, key: jax.Array) -> jax.Array:
        """EMA codebook step plus dead-code re-seeding; returns how many codes were re-seeded."""
        cluster_size = self.decay * self.cluster_size.value + (1.0 - self.decay) * counts
        embed_sum = self.decay * self.embed_sum.value + (1.0 - self.decay) * sums
        total = cluster_size.sum()
        smoothed = (cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        codebook = embed_sum / smoothed[:, None]
        dead = cluster_size < self.dead_code_threshold
        samples = flat[jax.random.randint(key, (self.codebook_size,), 0, flat.shape[0])]
        self.codebook.value = jnp.where(dead[:, None], samples, codebook)
        self.cluster_size.value = jnp.where(dead, self._fresh_size, cluster_size)
        self.embed_sum.value = jnp.where(dead[:, None], self._fresh_size * samples, embed_sum)
        return dead.sum().astype(jnp.int32)


class ResidualVectorQuantizer(nn.Module):
    """`num_quantizers` VectorQuantizers, each quantizing the residual the previous ones left.

    Levels are submodules `levels_0 … levels_{Q−1}`. `n_q` (static) uses only the first levels;
    initialise with `n_q=None` so every level's variables exist. The straight-through estimator
    spans the whole stack (gradient of the output w.r.t. x is the identity).
    """

    num_quantizers: int
    codebook_size: int
    dim: int
    decay: float = 0.99
    epsilon: float = 1e-5
    dead_code_threshold: float = 2.0
    kmeans_init: bool = True
    kmeans_iters: int = 50

    def setup(self):
        self.levels = [
            VectorQuantizer(
                self.codebook_size, self.dim, self.decay, self.epsilon, self.dead_code_threshold,
                self.kmeans_init, self.kmeans_iters,
            )
            for _ in range(self.num_quantizers)
        ]

    def __call__(self, x: jax.Array, n_q: int | None = None, *, update: bool = False) -> QuantizerOutput:
        return self.quantize(x, n_q, update=update)

    def _active(self, n_q: int | None) -> list[VectorQuantizer]:
        n_q = self.num_quantizers if n_q is None else n_q
        if not 1 <= n_q <= self.num_quantizers:
            raise ValueError(f"n_q must be in [1, {self.num_quantizers}], got {n_q}")
        return self.levels[:n_q]

    def quantize(self, x: jax.Array, n_q: int | None = None, *, update: bool = False) -> QuantizerOutput:
        """Quantize with the first `n_q` levels (all by default); codes `int32 [..., n_q]`."""
        x32 = jnp.asarray(x, jnp.float32)
        residual, total, outs = x32, jnp.zeros_like(x32), []
        for level in self._active(n_q):
            out = level.quantize(residual, update=update)
            q = jax.lax.stop_gradient(out.quantized)
            residual, total = residual - q, total + q
            outs.append(out)
        return QuantizerOutput(
            quantized=(x32 + jax.lax.stop_gradient(total - x32)).astype(x.dtype),
            codes=jnp.stack([o.codes for o in outs], axis=-1),
            commitment_loss=jnp.mean(jnp.stack([o.commitment_loss for o in outs])),
            perplexity=jnp.stack([o.perplexity for o in outs]),
            usage=jnp.stack([o.usage for o in outs]),
            dead_codes=jnp.stack([o.dead_codes for o in outs]),
        )

    def encode(self, x: jax.Array, n_q: int | None = None) -> jax.Array:
        """`[..., D]` → `int32 [..., n_q]`."""
        return self.quantize(x, n_q).codes

    def decode(self, codes: jax.Array) -> jax.Array:
        """`int [..., q]` → `float32 [..., D]`: the sum of the first q levels' codebook rows."""
        return sum(level.decode(codes[..., i]) for i, level in enumerate(self._active(codes.shape[-1])))

    def codebooks(self) -> jax.Array:
        """`[Q, K, D]` stacked codebooks."""
        return jnp.stack([level.codebook.value for level in self.levels])

    def set_codebooks(self, codebooks: jax.Array) -> None:
        """Installs `[Q, K, D]` fitted codebooks (the rvq stage's); use with `mutable=["vq_stats"]`."""
        if codebooks.shape != (self.num_quantizers, self.codebook_size, self.dim):
            raise ValueError(
                f"codebooks shape {codebooks.shape} != {(self.num_quantizers, self.codebook_size, self.dim)}"
            )
        for level, codebook in zip(self.levels, codebooks):
            level.set_codebook(codebook)
