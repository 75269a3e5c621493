"""Multi-host training simulated on one machine: 2 processes x 4 CPU devices vs 1 process x 8.

The global batch, augmentations (keyed by global example index), BatchNorm
statistics and the loss are the same however the devices are split between
processes, so both runs must log the same losses and end with the same
parameters; and a checkpoint written by either must resume in the other.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")
TRAIN = os.path.join(ROOT, "experiments", "train.py")
TINY = [
    "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits",
    "--config.model.widths=(8,16,16,16)", "--config.projector.hidden_dims=(32,)",
    "--config.projector.out_dim=16", "--config.batch_size=64", "--config.num_steps=6",
    "--config.log_every_steps=2", "--config.checkpoint.every_steps=3",
    "--config.optimizer.warmup_epochs=0", "--config.eval.final=False",
]
LAST_STEP = 6


def one_process(workdir, devices=8):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, TRAIN, f"--workdir={workdir}", *TINY], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def two_processes(workdir):
    return subprocess.Popen([sys.executable, LOCAL, "--num_processes=2", "--devices_per_process=4",
                             TRAIN, f"--workdir={workdir}", *TINY], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, what):
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"{what} failed (exit {proc.returncode}):\n{out[-4000:]}"
    return out


def resume_copy(source, target):
    """``target``: a copy of the finished run ``source`` without its last checkpoint (resumes at 3)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / str(LAST_STEP))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of: 1x8 devices, 2x4 devices, 1x8 resumed from the 2-process step-3 checkpoint,
    and 2x4 resumed from the 1-process step-3 checkpoint."""
    root = tmp_path_factory.mktemp("multiprocess")
    dirs = {name: root / name for name in ("one", "two", "resumed", "resumed_in_two")}
    one = one_process(dirs["one"])  # runs overlap: most of their time is start-up and compilation
    two = two_processes(dirs["two"])
    finish(two, "2 processes x 4 devices")
    finish(one, "1 process x 8 devices")
    resume_copy(dirs["two"], dirs["resumed"])
    resume_copy(dirs["one"], dirs["resumed_in_two"])
    resumed = one_process(dirs["resumed"])
    resumed_in_two = two_processes(dirs["resumed_in_two"])
    outputs = {"resumed": finish(resumed, "1-process resume of the 2-process checkpoint"),
               "resumed_in_two": finish(resumed_in_two, "2-process resume of the 1-process checkpoint")}
    return dirs, outputs


def logged(workdir):
    rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {row["step"]: row for row in rows}  # a resumed run re-logs steps after its checkpoint


def restore_on_host(workdir, step=LAST_STEP):
    """The saved train state as numpy arrays, whatever topology wrote it."""
    from clrjax.checkpoint import Checkpointer

    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    try:
        return checkpointer.restore_subtree(step)
    finally:
        checkpointer.close()


def assert_same_state(a, b, atol=1e-5):
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b) and len(flat_a) > 0
    for path, x in flat_a:
        np.testing.assert_allclose(x, flat_b[path], rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_two_processes_log_the_same_losses_as_one(runs):
    dirs, _ = runs
    one, two = logged(dirs["one"]), logged(dirs["two"])
    assert sorted(one) == sorted(two) == [2, 4, 6]
    for step in one:
        np.testing.assert_allclose(two[step]["loss"], one[step]["loss"], rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(two[step]["probe_acc"], one[step]["probe_acc"], atol=1e-6)
    assert len({one[s]["loss"] for s in one}) == 3  # it trained: the loss moved


def test_two_processes_end_with_the_same_parameters(runs):
    dirs, _ = runs
    one, two = restore_on_host(dirs["one"]), restore_on_host(dirs["two"])
    assert int(one["step"]) == int(two["step"]) == LAST_STEP
    assert_same_state(one["params"], two["params"])
    assert_same_state(one["batch_stats"], two["batch_stats"])
    assert_same_state(one["opt_state"], two["opt_state"])


@pytest.mark.parametrize("name", ["resumed", "resumed_in_two"])
def test_a_checkpoint_resumes_with_another_process_count(runs, name):
    """2 -> 1 and 1 -> 2 processes: same data position, RNG and optimizer state, so the
    run continues as if never interrupted."""
    dirs, outputs = runs
    assert "Resumed from step 3" in outputs[name]
    resumed, one = restore_on_host(dirs[name]), restore_on_host(dirs["one"])
    assert int(resumed["step"]) == LAST_STEP
    assert_same_state(one["params"], resumed["params"])
    assert_same_state(one["opt_state"], resumed["opt_state"])
    np.testing.assert_allclose(logged(dirs[name])[LAST_STEP]["loss"], logged(dirs["one"])[LAST_STEP]["loss"],
                               rtol=1e-5)
