"""`model.scan_layers`: a homogeneous stack of blocks as one `nn.scan`, so XLA compiles one block
instead of `num_layers` (compile time flat in depth), over parameters stacked on a leading `layers` axis.

The block's first argument is the carried activation; the others are the same for every layer
(broadcast). A decode-mode KV cache (the `cache` collection) is stacked like the parameters.
"""
from __future__ import annotations

import functools

from flax import linen as nn


@functools.cache
def _carry_form(block: type[nn.Module]) -> type[nn.Module]:
    """`block` in `nn.scan`'s (carry, output) form, output None."""

    class Scanned(block):
        @nn.compact
        def __call__(self, x, *args):
            return super().__call__(x, *args), None

    Scanned.__name__ = Scanned.__qualname__ = f"Scanned{block.__name__}"
    return Scanned


def layer_stack(block: type[nn.Module], num_layers: int, num_broadcast: int, remat: bool = False,
                num_scanned: int = 0, axis: str = "layers") -> type[nn.Module]:
    """A module class: construct it with `block`'s fields, call it as `block` → (x, None). The last
    `num_scanned` arguments are per layer (leading axis `num_layers`), the `num_broadcast` before them shared.
    `axis`: the stacked axis's logical name (a stack nested in another needs its own; unsharded)."""
    scanned = _carry_form(block)
    if remat:
        scanned = nn.remat(scanned, prevent_cse=False)
    return nn.scan(scanned, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True},
                   in_axes=(nn.broadcast,) * num_broadcast + (0,) * num_scanned, length=num_layers,
                   metadata_params={nn.PARTITION_NAME: axis})
