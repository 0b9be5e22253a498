"""RVQ over MuLan audio embeddings (DESIGN §4.3): 12 × 1024 codebooks by k-means per residual level.

Not gradient training: one step fits one level (melody_jax/tasks/rvq.py), so train.num_steps is
model.num_quantizers. `upstream.mulan` names the trained mulan stage; its data is used unless
`data.path` names another prepared dataset (at MuLan's sample rate).
"""
import ml_collections

from configs.common import check_preset, fitting_config


def get_config(arg: str | None = None):
    preset = check_preset(arg)
    tiny = preset == "tiny"
    c = fitting_config("rvq")
    c.preset = preset
    c.upstream = ml_collections.ConfigDict({"mulan": ""})  # the mulan stage's workdir (or a bundle's folder)
    c.model.num_quantizers = 12
    c.model.codebook_size = 16 if tiny else 1024  # tiny: the semantic LM's tiny MuLan vocabulary
    c.model.embed_dim = 128  # MuLan's out_dim (checked against the checkpoint)
    c.model.kmeans_iters = 20 if tiny else 50
    c.data.source = "upstream_audio"  # data.path: a prepared dataset; "" = the mulan stage's
    c.data.window_seconds = 2.0 if tiny else 10.0  # a clip's embedding is the mean over these windows
    c.data.embed_batch_size = 16 if tiny else 64  # windows per MuLan forward pass, embeddings per k-means chunk
    # k-means++ seeds on the first data.init_batches chunks of embeddings (0 = all, as an in-memory fit);
    # a bounded sample at scale [choice]: 256 × 64 = 16k embeddings for 1024 centres.
    c.data.init_batches = 0 if tiny else 256
    c.train.num_steps = c.model.num_quantizers
    c.train.log_every = 1
    c.train.eval_every = c.train.num_steps
    c.train.checkpoint_every = 1
    return c
