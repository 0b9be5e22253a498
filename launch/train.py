"""`python -m launch.train --config=configs/<stage>.py:<preset> --workdir=DIR [--config.a.b=v ...]`.

Trains any registered stage; the same command with the same workdir resumes. Multi-host: the same
command on every host; SLURM and multi-host Cloud TPU are detected (`--distributed=on` forces JAX's
detection), anything else passes `--coordinator=HOST:PORT --num_processes=N --process_id=I`.
"""
from __future__ import annotations

from absl import flags, logging
from ml_collections import config_flags

from launch.common import quiet_library_logs, run_app, run_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/toy_lm.py:tiny.")
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

    run_user_errors(lambda: initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                       _PROCESS_ID.value))
    summary = run_user_errors(lambda: train(get_task(_CONFIG.value), _WORKDIR.value))
    logging.info("finished: %s", summary)


if __name__ == "__main__":
    run_app(main)
