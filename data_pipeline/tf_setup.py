"""TensorFlow is only a data reader here: it must never take a GPU (or its memory) from JAX."""
from __future__ import annotations

import tensorflow as tf


def hide_gpus_from_tensorflow() -> None:
    """Makes no GPU visible to TensorFlow; a no-op once TF has initialised without GPUs."""
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:  # TF already initialised its devices
        if tf.config.get_visible_devices("GPU"):
            raise RuntimeError("TensorFlow initialised GPUs before the data pipeline could hide them") from e
