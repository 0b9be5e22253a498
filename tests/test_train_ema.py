"""Weight EMA in the train state: the closed form, bit-exact resume, old checkpoints, export."""
import jax
import numpy as np

from melody_jax.pipelines.bundle import export_stage
from melody_jax.training import ema
from melody_jax.training.checkpoint import Checkpointer
from melody_jax.frozen.loader import load_stage
from melody_jax.tasks.registry import get_task
from melody_jax.training.loop import init_sharded_state, train
from melody_jax.training.sharding import activate
from tests.helpers import stage_layout, toy_config

DECAY = 0.8
STEPS = 4


def config(overrides=None):
    fields = {"train.num_steps": STEPS, "train.checkpoint_every": 1, "train.keep_checkpoints": 10,
              "train.eval_every": 1000, "train.ema_decay": DECAY}
    return toy_config({**fields, **(overrides or {})})


def states(workdir, cfg, steps):
    """{step: host state} of the checkpoints `steps`, and step 0 rebuilt as the loop initialises it."""
    task, mesh, rules, abstract, shardings = stage_layout(cfg)
    ckpt = Checkpointer(str(workdir), keep=10, every=1)
    out = {}
    with activate(mesh, rules):
        for s in steps:
            out[s] = jax.device_get(ckpt.restore(s, ema.as_saved(abstract, ckpt.read_meta(s)))[0])
        init_rng = jax.random.split(jax.random.key(cfg.seed), 3)[0]
        out[0] = jax.device_get(init_sharded_state(task, shardings, init_rng))
    ckpt.close()
    return out


def closed_form(history):
    """d^N p_0 + (1 − d) Σ_{k=1..N} d^(N−k) p_k in float64."""
    n = len(history) - 1
    out = jax.tree.map(lambda p: DECAY**n * np.asarray(p, np.float64), history[0])
    for k in range(1, n + 1):
        out = jax.tree.map(lambda o, p, k=k: o + (1 - DECAY) * DECAY ** (n - k) * np.asarray(p, np.float64),
                           out, history[k])
    return out


def assert_close(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), y, rtol=0, atol=atol)


def test_ema_closed_form_resume_and_old_checkpoints(tmp_path):
    straight = tmp_path / "straight"
    train(get_task(config()), str(straight))
    s = states(straight, config(), range(1, STEPS + 1))
    assert s[0].ema is not None
    assert_close(s[STEPS].ema, closed_form([s[k].params for k in range(STEPS + 1)]), 1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(s[STEPS].ema), jax.tree.leaves(s[STEPS].params)))
    assert moved > 1e-3, "the EMA must differ from the raw parameters (else the test proves nothing)"

    resumed = tmp_path / "resumed"
    assert train(get_task(config({"train.stop_at_step": 2})), str(resumed))["status"] == "stopped"
    train(get_task(config()), str(resumed))
    r = states(resumed, config(), [STEPS])[STEPS]
    for a, b in zip(jax.tree.leaves(r.ema), jax.tree.leaves(s[STEPS].ema)):
        np.testing.assert_array_equal(a, b)  # bit for bit

    # a checkpoint written without EMA resumes with it: the EMA starts at the restored parameters
    old = tmp_path / "old"
    train(get_task(config({"train.ema_decay": 0.0, "train.stop_at_step": 2})), str(old))
    train(get_task(config()), str(old))
    o = states(old, config(), range(2, STEPS + 1))
    assert o[2].ema is None and o[3].ema is not None
    assert_close(o[STEPS].ema, closed_form([o[k].params for k in range(2, STEPS + 1)]), 1e-6)

    # export: --weights=ema holds the EMA, --weights=raw the parameters
    task, mesh, rules, _, _ = stage_layout(config())
    with activate(mesh, rules):
        for weights, expected in (("ema", s[STEPS].ema), ("raw", s[STEPS].params)):
            export_stage(str(straight), "toy_lm", str(tmp_path / f"bundle_{weights}"), mesh, rules, weights)
            loaded = load_stage(str(tmp_path / f"bundle_{weights}"), "toy_lm", mesh, rules, field="bundle")
            assert loaded.step == STEPS
            for a, b in zip(jax.tree.leaves(jax.device_get(loaded.params)), jax.tree.leaves(expected)):
                np.testing.assert_array_equal(a, b)
