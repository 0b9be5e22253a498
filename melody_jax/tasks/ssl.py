"""SSL stage (DESIGN §4.2, §7): pre-training of the Conformer encoder on unlabelled audio, by the wav2vec 2.0
objective or (model.objective="hubert") HuBERT's masked prediction of k-means targets (`ssl_targets`: fitted
by `setup`, they ride along with every batch under "frozen" and are assigned inside the step).

The Gumbel temperature depends on the step, which `Task.loss` does not see, so `train_step` computes
it from `state.step` and calls `objective`; evaluation quantizes without noise (temperature unused).
Logged: accuracy (chance = 1/(K+1), logged as `chance`), contrastive/diversity losses, soft
(`prob_perplexity`) and hard (`code_perplexity`, the codebook's) perplexities, temperature, and
`distractors_dropped` (near 1 = the codebook collapsed and accuracy no longer means anything) and
`codes_in_use` (distinct codes in the batch). HuBERT logs masked/unmasked cross-entropy and accuracy, the
majority target's share (`majority`, the accuracy of always guessing it) and the targets and predictions in use.
Frames of padding (the crop's `mask`) are neither targets nor distractors, in either objective.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from melody_jax.audio.frame_features import FEATURES
from melody_jax.audio.padding import frame_mask
from melody_jax.frozen.inputs import FrozenInputs
from melody_jax.frozen.loader import load_stage
from melody_jax.frozen.stage_models import build_model
from melody_jax.models.conformer import Wav2Vec2Conformer
from melody_jax.models.ssl_loss import hubert_loss, wav2vec2_loss
from melody_jax.tasks.sources import SourcedTask, prepared_audio
from melody_jax.tasks.ssl_targets import Frames, fit_targets, labels, target_frames
from melody_jax.training import accumulate
from melody_jax.training.config import non_negative, one_of, positive, require
from melody_jax.training.sharding import config_rules
from melody_jax.training.state import TrainState
from melody_jax.training.task import Batch


def gumbel_temperature(m, step: jax.Array) -> jax.Array:
    """Exponential from gumbel_start to gumbel_end over gumbel_anneal_steps, then constant."""
    frac = jnp.minimum(step.astype(jnp.float32) / m.gumbel_anneal_steps, 1.0)
    return m.gumbel_start * (m.gumbel_end / m.gumbel_start) ** frac


class SSLTask(SourcedTask):
    name = "ssl"
    sources = ("prepared_audio",)
    targets: dict[str, Any] | None = None  # HuBERT: fitted k-means targets (+ "upstream" params), set by `setup`
    frames: Frames | None = None  # HuBERT: what the targets cluster, set by `setup`

    def validate(self) -> None:
        c = self.config
        m = c.model
        require(m.get("arch", "conformer") == "conformer", f"config.model.arch={m.get('arch')!r}: a converted "
                "HuBERT/MERT tower is frozen (fit k-means on it with config.upstream.ssl); only 'conformer' trains")
        positive(c, "model.embed_dim", "model.num_layers", "model.num_heads", "model.mlp_dim", "model.conv_kernel",
                 "model.num_groups", "model.num_vars", "model.codevector_dim", "model.final_dim", "model.mask_length",
                 "model.num_negatives", "model.logit_temperature", "model.gumbel_start", "model.gumbel_end",
                 "model.gumbel_anneal_steps", "data.sample_rate", "data.crop_seconds")
        self.check_data()
        one_of(c, "model.objective", ("wav2vec2", "hubert"))
        one_of(c, "model.conv_norm", ("layer", "group"))
        if m.objective == "hubert":
            positive(c, "model.num_targets", "model.target_batches")
            non_negative(c, "model.unmasked_weight")
            require(bool(c.upstream.ssl) or (len(m.target_features) > 0 and all(
                set(entry.split("+")) <= set(FEATURES) for entry in m.target_features)),
                    f"config.model.target_features={list(m.target_features)}: each entry (one codebook) must join "
                    f"some of {FEATURES} with '+'")
            require(len(m.target_weights) in (0, len(m.target_features)) and min(m.target_weights, default=0) >= 0,
                    f"config.model.target_weights={list(m.target_weights)}: one non-negative weight per "
                    f"target_features entry ({len(m.target_features)}), or [] for 1 each")
            require(m.target_layer >= -1, f"config.model.target_layer={m.target_layer} must be -1 (middle) or a block")
        require(m.objective == "hubert" or not c.upstream.ssl,
                "config.upstream.ssl (targets from a trained SSL model) needs model.objective='hubert'")
        require(len(m.conv_channels) == len(m.conv_strides) > 0,
                f"config.model.conv_channels has {len(m.conv_channels)} entries, conv_strides {len(m.conv_strides)}")
        require(m.embed_dim % m.num_heads == 0 and (m.embed_dim // m.num_heads) % 2 == 0,
                f"config.model.embed_dim={m.embed_dim} / num_heads={m.num_heads} must be an even integer (rotary)")
        require(m.codevector_dim % m.num_groups == 0,
                f"config.model.codevector_dim={m.codevector_dim} must be divisible by num_groups={m.num_groups}")
        require(m.conv_kernel % 2 == 1, f"config.model.conv_kernel={m.conv_kernel} must be odd")
        require(0.0 < m.mask_prob <= m.mask_length, f"config.model.mask_prob={m.mask_prob} must lie in (0, mask_length]")
        require(0.0 <= m.dropout < 1.0, f"config.model.dropout={m.dropout} must lie in [0, 1)")
        require(m.dtype in ("float32", "bfloat16"), f"config.model.dtype={m.dtype!r} must be float32 or bfloat16")
        frames = self.crop_samples // self.model.hop
        require(frames >= 2 * m.mask_length, f"config.data.crop_seconds={c.data.crop_seconds} gives {frames} frames, "
                                             f"fewer than 2 × model.mask_length={m.mask_length}")

    @property
    def crop_samples(self) -> int:
        return int(round(self.config.data.crop_seconds * self.config.data.sample_rate))

    @property
    def model(self) -> Wav2Vec2Conformer:
        return build_model(self.config).module

    def setup(self, mesh: jax.sharding.Mesh) -> None:
        """HuBERT: fits the targets on the training stream's first batches (iteration 2: on `upstream.ssl`)."""
        c = self.config
        if c.model.objective != "hubert" or self.targets is not None:
            return
        up = (load_stage(c.upstream.ssl, "ssl", mesh, config_rules(c), field="config.upstream.ssl")
              if c.upstream.ssl else None)
        if up is not None:
            require(up.model.hop == self.model.hop and up.config.data.sample_rate == c.data.sample_rate,
                    f"config.upstream.ssl: its frames (hop {up.model.hop} at {up.config.data.sample_rate} Hz) "
                    f"differ from this model's (hop {self.model.hop} at {c.data.sample_rate} Hz)")
            blocks = up.config.model.num_layers
            require(c.model.target_layer <= blocks, f"config.model.target_layer={c.model.target_layer} but the "
                                                    f"SSL model in {c.upstream.ssl} has {blocks} blocks")
        self.frames = target_frames(c, up, self.model.hop)
        params = None if up is None else up.params
        targets = fit_targets(self.frames, params, prepared_audio(c, mesh, "train", with_text=False),
                              c.model.target_batches, self.model.hop, c.model.num_targets, jax.random.key(c.seed), mesh)
        self.targets = targets if up is None else {**targets, "upstream": params}

    def init_params(self, rng: jax.Array) -> Any:
        return build_model(self.config).init(rng)

    def objective(self, params, batch: Batch, rng: jax.Array, train: bool, temperature: jax.Array):
        c = self.config
        m = c.model
        mask_rng, gumbel_rng, drop_rng, neg_rng = jax.random.split(rng, 4)
        out = self.model.apply({"params": params}, batch["audio"], temperature=temperature, train=train,
                               rngs={"mask": mask_rng, "gumbel": gumbel_rng, "dropout": drop_rng})
        valid = frame_mask(batch["mask"], self.model.hop, out["mask"].shape[1]) if "mask" in batch else None
        if m.objective == "hubert":
            weights = [1.0] * len(self.frames) if c.upstream.ssl or not m.target_weights else list(m.target_weights)
            return hubert_loss(out, labels(self.frames, batch["frozen"], batch["audio"]), valid=valid,
                               codebook_weights=weights,
                               unmasked_weight=m.unmasked_weight, feature_penalty_weight=m.feature_penalty_weight)
        loss, metrics = wav2vec2_loss(out, neg_rng, num_negatives=m.num_negatives,
                                      logit_temperature=m.logit_temperature, num_codes=m.num_groups * m.num_vars,
                                      diversity_weight=m.diversity_weight,
                                      feature_penalty_weight=m.feature_penalty_weight,
                                      valid=valid)
        return loss, {**metrics, "temperature": jnp.asarray(temperature, jnp.float32),
                      "chance": jnp.asarray(1.0 / (m.num_negatives + 1), jnp.float32)}

    def loss(self, params, batch: Batch, rng: jax.Array, train: bool = True):
        return self.objective(params, batch, rng, train, jnp.asarray(self.config.model.gumbel_end, jnp.float32))

    def train_step(self, state: TrainState, batch: Batch, rng: jax.Array):
        temperature = gumbel_temperature(self.config.model, state.step)
        (loss, metrics), grads = accumulate.value_and_grad(self.objective, state.params, batch, rng,
                                                           accumulate.steps(self.config), True, temperature)
        updates, opt_state = self.optimizer().update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return state.replace(params=params, opt_state=opt_state), metrics

    def batches(self, mesh, split: str):
        audio = prepared_audio(self.config, mesh, split, with_text=False)
        return audio if self.targets is None else FrozenInputs(audio, self.targets)
