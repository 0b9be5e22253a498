"""`python -m launch.train --config=configs/<stage>.py:<preset> --workdir=DIR [--config.a.b=v ...]`.

Trains any registered stage; the same command with the same workdir resumes.
"""
from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

from launch.common import quiet_library_logs, run_user_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file, e.g. configs/toy_lm.py:tiny.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.json.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    from melody_jax.training.loop import train

    summary = run_user_errors(lambda: train(_CONFIG.value, _WORKDIR.value))
    logging.info("finished: %s", summary)


if __name__ == "__main__":
    app.run(main)
