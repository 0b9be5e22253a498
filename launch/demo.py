"""`make demo`: the main job. Until the end-to-end MeLoDy pipeline lands, it trains the toy LM
(the semantic LM's decoder) with the real training core and shows its loss curve.

Writes WORKDIR/toy_lm/ (checkpoints, metrics.jsonl, TensorBoard) and WORKDIR/loss_curve.png.
Run it again and it resumes (or, once finished, just prints the curve).
"""
from __future__ import annotations

import os

from absl import app, flags

from launch.common import quiet_library_logs, run_user_errors

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo writes its runs and plots.")
_PRESET = flags.DEFINE_enum("preset", "tiny", ["tiny", "small"], "Toy LM size.")


def plot(records: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in records if isinstance(r.get("loss"), float)]
    evals = [(r["step"], r["eval_loss"]) for r in records if isinstance(r.get("eval_loss"), float)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o", label="eval loss")
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", yscale="log", title="toy LM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str]) -> None:
    del argv
    quiet_library_logs()
    from configs import toy_lm
    from melody_jax.training.loop import train
    from melody_jax.training.metrics import read_metrics

    workdir = os.path.join(_WORKDIR.value, "toy_lm")
    config = toy_lm.get_config(_PRESET.value)
    summary = run_user_errors(lambda: train(config, workdir))
    records = read_metrics(workdir)
    print("\nstep  loss     accuracy")
    for r in records:
        if "loss" in r and (r["step"] % 20 == 0 or r["step"] == 1):
            print(f"{r['step']:>4}  {r['loss']:<8.4f} {r.get('accuracy', float('nan')):.3f}")
    path = os.path.join(_WORKDIR.value, "loss_curve.png")
    plot(records, path)
    print(f"\nfinal: {summary}\nloss curve: {path}")


if __name__ == "__main__":
    app.run(main)
