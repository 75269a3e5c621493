"""Preemption and hard kills, driving experiments/train.py as a real subprocess.

* SIGTERM: the run finishes its step, saves, waits for the save, exits 75;
  re-running continues.
* kill -9 at a random moment (also mid async save): the re-run resumes from
  the newest complete checkpoint, ignores (and reports) incomplete ones, and
  ends bit-identical to an uninterrupted run.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from clrjax import checkpoint as ckpt_lib
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXIT_PREEMPTED = 75

TINY = [
    "--config.model.widths=(8,16,16,16)", "--config.projector.hidden_dims=(32,)",
    "--config.projector.out_dim=16", "--config.batch_size=64", "--config.log_every_steps=1",
    "--config.eval.final=False", "--config.optimizer.warmup_epochs=0.1",
]


def _cmd(workdir, steps, every):
    return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
            "--config=" + os.path.join(ROOT, "configs", "tico.py") + ":digits",
            f"--workdir={workdir}", *TINY, f"--config.num_steps={steps}",
            f"--config.checkpoint.every_steps={every}"]


def _env():
    return dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")


def _run(workdir, steps, every):
    return subprocess.run(_cmd(workdir, steps, every), env=_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def _start(workdir, steps, every):
    return subprocess.Popen(_cmd(workdir, steps, every), env=_env(), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    rows = [ln for ln in open(path).read().splitlines() if ln.strip()]
    try:
        return json.loads(rows[-1])["step"] if rows else 0
    except json.JSONDecodeError:
        return 0


def _wait_for_step(proc, workdir, step, timeout=300):
    deadline = time.time() + timeout
    while _logged_steps(workdir) < step:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "run did not reach the step in time"
        time.sleep(0.05)


def _final_state(workdir):
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    step = checkpointer.latest_step()
    state = checkpointer.restore_subtree(step)
    checkpointer.close()
    return step, state


def test_sigterm_saves_exits_75_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    proc = _start(workdir, steps=400, every=1000)   # no periodic save before the signal
    _wait_for_step(proc, workdir, 5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    checkpoints = os.listdir(os.path.join(workdir, "checkpoints"))
    saved = max(int(c) for c in checkpoints if c.isdigit())
    assert 5 <= saved < 400
    again = _run(workdir, steps=saved + 3, every=1000)
    # Different num_steps is a config change; the error must say so and name the field.
    assert again.returncode == 3 and "num_steps" in again.stderr


def test_kill9_anytime_resumes_bit_exact(tmp_path):
    steps, every = 24, 4
    reference = str(tmp_path / "reference")
    assert _run(reference, steps, every).returncode == 0
    _, want = _final_state(reference)

    workdir = str(tmp_path / "killed")
    rng = random.Random(0)
    for _ in range(2):
        proc = _start(workdir, steps, every)
        target = _logged_steps(workdir) + rng.randint(3, 9)
        if target < steps:
            _wait_for_step(proc, workdir, target)
            time.sleep(rng.uniform(0.0, 0.05))  # land anywhere, also inside an async save
        proc.kill()
        proc.wait()
    # A leftover of an interrupted save must be ignored and reported, never loaded.
    os.makedirs(os.path.join(workdir, "checkpoints", "23.orbax-checkpoint-tmp-1700000000"), exist_ok=True)
    done = _run(workdir, steps, every)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "incomplete checkpoint" in done.stderr
    step, got = _final_state(workdir)
    assert step == steps
    for name in ("params", "opt_state", "batch_stats", "method_state"):
        jax.tree.map(np.testing.assert_array_equal, got[name], want[name])
