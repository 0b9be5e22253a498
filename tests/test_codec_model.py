"""MusicGen codec model (DESIGN §6): the code layout and round-trip shapes, tiny and paper (shapes only)."""
import jax
import jax.numpy as jnp
from flax import linen as nn

from melody_jax.models import codec
from melody_jax.tasks.codec import CodecTask
from tests.helpers import stage_config


def test_codes_layout_and_round_trip_shapes():
    task = CodecTask(stage_config("codec", {"data.path": "x"}))
    model = task.model
    variables = nn.meta.unbox(task.init_generator(jax.random.key(0)))
    audio = 0.3 * jax.random.normal(jax.random.key(1), (2, 12_800 + 100))  # padded to 21 frames
    codes = jax.jit(lambda v, a: codec.encode(v, a, model))(variables, audio)
    assert codes.dtype == jnp.int32 and codes.shape == (2, 4, 21)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    assert jax.jit(lambda v, c: codec.decode(v, c, model))(variables, codes).shape == (2, 21 * 640)
    paper = CodecTask(stage_config("codec", {"data.path": "x"}, preset="paper"))
    abstract = nn.meta.unbox(jax.eval_shape(paper.init_generator, jax.random.key(0)))
    ten_s = jax.ShapeDtypeStruct((1, 320_000), jnp.float32)
    assert jax.eval_shape(lambda v, a: codec.encode(v, a, paper.model), abstract, ten_s).shape == (1, 4, 500)
