"""k-means over a frozen SSL model's layer (DESIGN §4.2): the semantic tokenizer's 1024 centroids.

Not gradient training: one step = one k-means iteration streamed over the data (melody_jax/tasks/kmeans.py), so
train.num_steps is the number of iterations. `upstream.ssl` names the trained ssl stage; its
data is used unless `data.path` names another prepared dataset (at its sample rate).
`model.layer` = -1 takes the middle Conformer block.
"""
import ml_collections

from configs.common import check_preset, fitting_config


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    c = fitting_config("kmeans")
    c.preset = preset
    c.upstream = ml_collections.ConfigDict({"ssl": ""})  # the ssl stage's workdir (or a bundle's ssl folder)
    c.model.layer = -1  # -1 = num_layers // 2
    c.model.num_clusters = 32 if tiny else 1024
    c.model.embed_dim = {"tiny": 64, "small": 256, "base": 512, "paper": 768}[preset]  # checked against the SSL model
    c.model.mode = "full"  # full Lloyd (sums over all frames) | minibatch (Sculley, one update per chunk)
    c.data.source = "upstream_audio"  # data.path: a prepared dataset; "" = the ssl stage's
    c.data.crop_seconds = 1.6 if tiny else 10.0
    c.data.embed_batch_size = 16 if tiny else 64  # crops per SSL forward pass (global) = one chunk
    # 0 = one pass over the training set. Larger presets subsample (HuBERT fits on a subset too): paper
    # 500 batches × 64 crops × 50 frames = 1.6M frames a pass, streamed one batch at a time (every pass re-runs
    # the SSL model over the same crops, so the frames never sit in memory together).
    c.data.num_batches = 0 if tiny else 500
    c.data.frames_per_crop = 0 if tiny else 50  # random frames kept per crop (0 = all 250)
    # k-means++ seeds on the first data.init_batches batches of a pass (0 = all of it, as an in-memory fit);
    # a bounded sample at scale [choice]: paper 50 × 64 crops × 50 frames = 160k frames for 1024 centres.
    c.data.init_batches = 0 if tiny else 50
    c.train.num_steps = 20 if tiny else 100
    c.train.log_every = 1
    c.train.eval_every = c.train.num_steps
    c.train.checkpoint_every = 5 if tiny else 10
    return c
