"""`python -m launch.train --config=configs/<stage>.py:<preset> --workdir=DIR [--config.a.b=v ...]`.

Trains any registered stage; the same command with the same workdir resumes. Multi-host: the same
command on every host; SLURM and multi-host Cloud TPU are detected (`--distributed=on` forces JAX's
detection), anything else passes `--coordinator=HOST:PORT --num_processes=N --process_id=I`.
"""
from __future__ import annotations

from absl import flags, logging

from launch.common import CONFIG_OVERRIDES, load_config, quiet_library_logs, run_app, run_user_errors

_CONFIG = flags.DEFINE_string("config", None, "Stage config file and preset, e.g. configs/toy_lm.py:tiny; "
                             "--config.a.b=value overrides a field.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.json.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Join a multi-process job: auto = when a coordinator is given or a cluster detected.")
_COORDINATOR = flags.DEFINE_string("coordinator", "", "HOST:PORT of process 0's coordinator (explicit start-up).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (explicit start-up).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in [0, num_processes).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    from melody_jax.training.distributed import initialize
    from melody_jax.tasks.registry import get_task
    from melody_jax.training.loop import train

    config = run_user_errors(lambda: load_config(_CONFIG.value, CONFIG_OVERRIDES))
    run_user_errors(lambda: initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value))
    summary = run_user_errors(lambda: train(get_task(config), _WORKDIR.value))
    logging.info("finished: %s", summary)


if __name__ == "__main__":
    run_app(main)
