"""`python -m launch.plan --config=configs/<stage>.py:<preset> [--mesh=data=8,fsdp=8] [--devices=64]`.

Compiles the train step ahead of time for a mesh of `--devices` fake CPU devices and prints the memory
per device (parameters, optimizer state, activations/temp) and the collectives in the compiled HLO.
Nothing is materialised: the state exists only as shapes. `--strategy` picks config.sharding.strategy.
"""
from __future__ import annotations

import math
import os
import re

from absl import flags

from launch.common import CONFIG_OVERRIDES, load_config, quiet_library_logs, run_app, run_user_errors
from melody_jax.training.metrics import write_json_atomic

_CONFIG = flags.DEFINE_string("config", None, "Stage config file and preset, e.g. configs/dpd.py:paper; "
                             "--config.a.b=value overrides a field.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh as 'data=8,fsdp=8,tensor=1' (unnamed axes are 1); default: config.mesh.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Fake CPU devices (default: the mesh's size, else 8).")
_STRATEGY = flags.DEFINE_enum("strategy", None, ["dp", "fsdp", "tp", "fsdp_tp"], "Overrides config.sharding.strategy.")
_JSON = flags.DEFINE_string("json_out", "", "Also write the numbers to this JSON file.")
flags.mark_flags_as_required(["config"])


def parse_mesh(text: str) -> dict[str, int]:
    from melody_jax.training.errors import ConfigError

    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, size = part.partition("=")
        if not sep or axis not in sizes or not re.fullmatch(r"-?\d+", size.strip()):
            raise ConfigError(f"--mesh={text!r}: each part must be AXIS=SIZE with AXIS in {tuple(sizes)}")
        sizes[axis] = int(size)
    return sizes


def use_fake_devices(count: int) -> None:
    """Must run before JAX creates its backend: CPU only, `count` devices."""
    import jax

    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")).strip()
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", count)


def run() -> dict:
    from melody_jax.tasks.registry import get_task
    from melody_jax.training.plan import format_plan, plan_train_step

    config = load_config(_CONFIG.value, CONFIG_OVERRIDES)
    if _MESH.value:
        config.mesh = parse_mesh(_MESH.value)
    if _STRATEGY.value:
        config.sharding.strategy = _STRATEGY.value
    sizes = dict(config.mesh)
    devices = _DEVICES.value or (math.prod(sizes.values()) if -1 not in sizes.values() else 8)
    use_fake_devices(devices)
    result = plan_train_step(get_task(config))
    print(format_plan(result), flush=True)
    if _JSON.value:
        write_json_atomic(_JSON.value, result)
    return result


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    run_user_errors(run)


if __name__ == "__main__":
    run_app(main)
