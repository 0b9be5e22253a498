"""Every stage's tiny model under FSDP and tensor parallel on 8 devices: the specs its big weights get.

A new stage joins with one line in STAGES: (stage, {param path: (spec under fsdp, spec under tp)}).
"""
import json
import math

import jax
import pytest
from jax.sharding import PartitionSpec as P

from melody_jax.training.errors import ConfigError
from melody_jax.training.loop import sharded_abstract_state, train
from melody_jax.training.sharding import (DEFAULT_RULES, STRATEGIES, activate, assert_sharded, config_rules,
                                          make_mesh, rules_from_config)
from melody_jax.tasks.registry import get_task
from tests.helpers import stage_config, toy_config

MESHES = {"fsdp": {"mesh.data": 2, "mesh.fsdp": 4, "mesh.tensor": 1},
          "tp": {"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 4}}
AXIS = {"fsdp": "fsdp", "tp": "tensor"}

STAGES = [
    ("toy_lm", {"layer_0/mlp/gate/kernel": (P("fsdp", None), P(None, "tensor")),
                "layer_0/attn/query/kernel": (P("fsdp", None, None), P(None, "tensor", None)),
                "embedding": (P(None, "fsdp"), P("tensor", None))}),
    ("dpd", {"block_0/sru_0/forward/proj/kernel": (P("fsdp", None, None), P(None, None, "tensor"))}),
    ("semantic_lm", {"decoder/embedding": (P(None, "fsdp"), P("tensor", None)),
                     "decoder/layer_0/mlp/down/kernel": (P(None, "fsdp"), P("tensor", None))}),
    ("mulan", {"token_embedding": (P(None, "fsdp"), P("tensor", None)),
               "audio_encoder/layer_0/mlp/fc1/kernel": (P("fsdp", None), P(None, "tensor"))}),
    ("rvq", {"codebooks": (P(None, "fsdp", None), P(None, "tensor", None))}),
    ("vae_gan", {"generator/decoder/up_0/kernel": (P(None, "fsdp", None), P(None, None, "tensor")),
                 "generator/encoder/conv_post/kernel": (P(None, "fsdp", None), P(None, None, "tensor"))}),
    ("ssl", {"blocks_0/ffn_in/fc1/kernel": (P("fsdp", None), P(None, "tensor")),
             "blocks_0/conv/pointwise_in/kernel": (P("fsdp", None, None), P(None, None, "tensor"))}),
    ("kmeans", {"centroids": (P("fsdp", None), P("tensor", None))}),
    ("codec", {"generator/decoder/Upsample_0/kernel": (P(None, "fsdp", None), P(None, None, "tensor")),
               "generator/encoder/Conv_4/kernel": (P(None, "fsdp", None), P(None, None, "tensor"))}),
    ("musicgen", {"layers_0/mlp/fc1/kernel": (P("fsdp", None), P(None, "tensor")),
                  "head/kernel": (P("fsdp", None, None), P(None, None, "tensor"))}),
]
NO_OPTIMIZER = ("rvq", "kmeans")  # fitted by k-means, not gradients: no optimizer state


def named_leaves(tree) -> dict[str, jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in flat}


def moments_of(opt_state, name: str) -> list[jax.ShapeDtypeStruct]:
    """The optimizer-state leaves of parameter `name`: `…/mu/<name>`, or for a GAN's per-network
    optimizers (`generator/0/mu/<rest of name>`) the network's own subtree."""
    network, _, rest = name.partition("/")
    return [leaf for path, leaf in named_leaves(opt_state).items()
            if path.endswith("/" + name) or (rest and path.startswith(network + "/") and path.endswith("/" + rest))]


def abstract_state(stage: str, strategy: str, overrides=None):
    config = stage_config(stage, {"sharding.strategy": strategy, **MESHES[strategy], **(overrides or {})})
    mesh, rules = make_mesh(config.mesh), config_rules(config)
    with activate(mesh, rules):
        abstract, _ = sharded_abstract_state(get_task(config), mesh, rules, jax.random.key(0))
    return config, abstract


@pytest.mark.parametrize("strategy", ["fsdp", "tp"])
@pytest.mark.parametrize("stage, expected", STAGES, ids=[s for s, _ in STAGES])
def test_largest_parameters_are_split(stage, expected, strategy):
    config, abstract = abstract_state(stage, strategy)
    params = named_leaves(abstract.params)
    for name, specs in expected.items():
        want = specs[0 if strategy == "fsdp" else 1]
        assert params[name].sharding.spec == want, f"{stage} {name}: {params[name].sharding.spec} != {want}"
        # the optimizer state of a parameter (Adam's mu and nu) is laid out like the parameter
        moments = moments_of(abstract.opt_state, name)
        assert all(m.sharding.spec == want for m in moments), f"{stage} {name}: optimizer state differs"
        assert len(moments) == (0 if stage in NO_OPTIMIZER else 2), f"{stage} {name}: {len(moments)} moments"
    largest = max(params.values(), key=lambda leaf: math.prod(leaf.shape))
    assert AXIS[strategy] in jax.tree.leaves(tuple(largest.sharding.spec)), f"{stage}: largest weight is whole"
    if strategy == "fsdp":  # every weight at least a quarter the size of the largest is split over fsdp
        assert_sharded(abstract, config, min_size=math.prod(largest.shape) // 4)


def test_replicated_weight_fails_fast_naming_it():
    unsharded = [[name, None] for name in ("embed", "mlp", "heads", "vocab")]
    config, abstract = abstract_state("toy_lm", "fsdp", {"sharding_rules": json.dumps(unsharded)})
    with pytest.raises(ConfigError, match=r"strategy='fsdp' but params/embedding \(64, 64\) \(4096 elements\) "
                                          r"is not sharded over fsdp"):
        assert_sharded(abstract, config, min_size=4096)
    assert_sharded(abstract, config, min_size=8193)  # no weight is that large: the same layout passes


def test_training_refuses_a_replicated_fsdp_layout_before_any_step(tmp_path):
    config = toy_config({"sharding.strategy": "fsdp", "sharding.min_sharded_size": 8192, **MESHES["fsdp"],
                         "sharding_rules": json.dumps([["embed", None], ["mlp", None]])})
    with pytest.raises(ConfigError, match=r"params/layer_0/mlp/down/kernel \(128, 64\)"):
        train(get_task(config), str(tmp_path))
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_strategies_and_overrides_resolve_in_order():
    assert STRATEGIES["fsdp_tp"] == DEFAULT_RULES == rules_from_config([])
    rules = rules_from_config([["embed", None], ["extra", "tensor"]], "fsdp_tp")
    names = [name for name, _ in rules]
    assert names.index("embed") == [n for n, _ in DEFAULT_RULES].index("embed")  # kept its position
    assert dict(rules)["embed"] is None and rules[-1] == ("extra", "tensor")
    assert dict(rules_from_config([], "dp"))["embed"] is None
    assert dict(rules_from_config([], "tp"))["mlp"] == "tensor"
    with pytest.raises(ConfigError, match=r"config.sharding.strategy='zero3' must be one of"):
        rules_from_config([], "zero3")
