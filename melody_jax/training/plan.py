"""Ahead-of-time plan of a train step on a mesh: memory per device and collectives, nothing materialised.

Shapes first: `jax.eval_shape` gives the state, the config's rules give its shardings, and the
jitted, donated step (the loop's own) is lowered and compiled against those abstract values, so a
64-device layout of a paper-size model can be checked on a laptop with fake CPU devices.
The one concrete input is the first data batch (its shape and sharding are what the loop feeds).
"""
from __future__ import annotations

import math
import re
import time
from typing import Any

import jax

from melody_jax.training.errors import ConfigError
from melody_jax.training.loop import check_batch, guarded, sharded_abstract_state, validate
from melody_jax.training.sharding import activate, assert_sharded, config_mesh, config_rules
from melody_jax.training.task import Task

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"\b(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def count_collectives(hlo_text: str) -> dict[str, int]:
    """Collective instructions in HLO text (an async pair's `-start` counts once, `-done` not at all)."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    for match in _OP.finditer(hlo_text):
        counts[match.group(1)] += 1
    return counts


def bytes_per_device(abstract: Any) -> int:
    """Bytes one device holds of a pytree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(abstract):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _abstract_batch(task, mesh) -> dict[str, Any]:
    """The first batch's shapes; nested, as batches carrying frozen stages' parameters are."""
    batch = next(task.train_iterator(mesh))
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding), batch)


def plan_train_step(task: Task) -> dict[str, Any]:
    """Lowers and compiles the loop's train step for `task.config.mesh`; returns sizes (bytes) and counts."""
    config = task.config
    validate(task)
    if type(task).run_step is not Task.run_step:
        raise ConfigError(f"config.stage={config.stage!r} is fitted pass by pass (a streamed fit), not by one "
                          "compiled train step: there is nothing to plan")
    mesh = config_mesh(config)
    rules = config_rules(config)
    check_batch(config, mesh)
    with activate(mesh, rules):
        task.setup(mesh)  # upstream stages, before any iterator (as the loop does)
        init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
        abstract, shardings = sharded_abstract_state(task, mesh, rules, init_rng)
        assert_sharded(abstract, config)
        batch = _abstract_batch(task, mesh)
        step_fn = jax.jit(guarded(task, step_rng), out_shardings=(shardings, None), donate_argnums=(0,))
        t0, c0 = time.perf_counter(), time.process_time()
        lowered = step_fn.lower(abstract, batch)
        t1, c1 = time.perf_counter(), time.process_time()
        compiled = lowered.compile()
        t2, c2 = time.perf_counter(), time.process_time()
    memory = compiled.memory_analysis()
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract.params))
    return {
        "stage": config.stage, "mesh": dict(mesh.shape), "strategy": config.sharding.strategy,
        "devices": mesh.size, "num_params": num_params,
        "params_bytes": bytes_per_device(abstract.params),
        "opt_state_bytes": bytes_per_device(abstract.opt_state),
        "batch_bytes": bytes_per_device(batch),
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "code_bytes": memory.generated_code_size_in_bytes,
        "collectives": count_collectives(compiled.as_text()),
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        "lower_cpu_s": c1 - c0, "compile_cpu_s": c2 - c1,  # this process's CPU time: steadier on shared cores
    }


def format_plan(p: dict[str, Any]) -> str:
    mib = 1 << 20
    mesh = ", ".join(f"{k}={v}" for k, v in p["mesh"].items())
    peak = p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
    lines = [
        f"stage {p['stage']}: {p['num_params'] / 1e6:.1f}M parameters; mesh {mesh} ({p['devices']} devices); "
        f"strategy {p['strategy']}",
        "per device (MiB):",
        f"  parameters        {p['params_bytes'] / mib:12.3f}",
        f"  optimizer state   {p['opt_state_bytes'] / mib:12.3f}",
        f"  batch             {p['batch_bytes'] / mib:12.3f}",
        f"  activations/temp  {p['temp_bytes'] / mib:12.3f}",
        f"  arguments         {p['argument_bytes'] / mib:12.3f}",
        f"  outputs           {p['output_bytes'] / mib:12.3f}  (aliased to inputs: {p['alias_bytes'] / mib:.1f})",
        f"  peak estimate     {peak / mib:12.3f}",
        "collectives: " + ", ".join(f"{k} {v}" for k, v in p["collectives"].items()),
        f"lowering {p['lower_s']:.1f} s, compilation {p['compile_s']:.1f} s (CPU time {p['lower_cpu_s']:.1f} s, "
        f"{p['compile_cpu_s']:.1f} s)",
    ]
    return "\n".join(lines)
