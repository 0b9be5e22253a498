"""`python -m launch.train --config=configs/<stage>.py:<preset> --workdir=DIR [--config.a.b=v ...]`.

Trains any registered stage; the same command with the same workdir resumes. Multi-host: the same
command on every host; SLURM and multi-host Cloud TPU are detected (`--distributed=on` forces JAX's
detection), anything else passes `--coordinator=HOST:PORT --num_processes=N --process_id=I`.
"""
from __future__ import annotations

from absl import flags, logging

from launch.common import CONFIG_OVERRIDES, DistributedFlags, load_config, quiet_library_logs, run_app, run_user_errors

_CONFIG = flags.DEFINE_string("config", None, "Stage config file and preset, e.g. configs/toy_lm.py:tiny; "
                             "--config.a.b=value overrides a field.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.json.")
_DISTRIBUTED = DistributedFlags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    from melody_jax.tasks.registry import get_task
    from melody_jax.training.loop import train

    config = run_user_errors(lambda: load_config(_CONFIG.value, CONFIG_OVERRIDES))
    _DISTRIBUTED.join()
    summary = run_user_errors(lambda: train(get_task(config), _WORKDIR.value))
    logging.info("finished: %s", summary)


if __name__ == "__main__":
    run_app(main)
