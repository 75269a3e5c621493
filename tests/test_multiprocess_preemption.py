"""SIGTERM to ONE process of a 2-process run: every process stops after the same step.

experiments/train.py sets a flag on SIGTERM; clrjax.train._agreed_stop combines
the flags of all processes every ``log_every_steps`` steps, so the process that
got no signal stops too (instead of hanging in its next collective), both save
one checkpoint together and exit 75, and re-running the same command resumes.

The two processes are started directly (not via launch/local.py, which would
forward a signal to both) so that only process 1 is signalled.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from clrjax.checkpoint import TMP_MARKER
from launch.local import build_specs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "experiments", "train.py")
EXIT_PREEMPTED = 75
NUM_STEPS = 1000          # far more than the run gets to do before the signal
LOG_EVERY = 2
TINY = [
    "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits",
    "--config.model.widths=(8,16,16,16)", "--config.projector.hidden_dims=(32,)",
    "--config.projector.out_dim=16", "--config.batch_size=64",
    f"--config.log_every_steps={LOG_EVERY}", "--config.checkpoint.every_steps=100000",
    "--config.optimizer.warmup_epochs=0", "--config.eval.final=False",
]
START_TIMEOUT_S = 120     # start-up + compilation of both processes on a loaded machine
STOP_TIMEOUT_S = 60       # signal -> both processes saved and exited


def _start(workdir, tmp_path, tag, extra):
    """Starts processes 0 and 1 (2 CPU devices each); returns the Popen handles and their log paths."""
    specs = build_specs([TRAIN, f"--workdir={workdir}", *TINY, *extra], num_processes=2,
                        devices_per_process=2, platform="cpu")
    procs, logs = [], []
    for spec in specs:
        log_path = tmp_path / f"{tag}_p{spec.process_id}.log"
        with open(log_path, "w") as log:
            procs.append(subprocess.Popen(spec.argv, env=dict(os.environ, **spec.env), cwd=ROOT,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        logs.append(log_path)
    return procs, logs


def _kill(procs):
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)


def _wait_all(procs, timeout):
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
    return [proc.returncode for proc in procs]


def _tails(logs):
    return "\n".join(f"--- {path.name}:\n{path.read_text()[-3000:]}" for path in logs)


def _logged_steps(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written right now
    return steps


def _checkpoint_steps(workdir):
    directory = workdir / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def _saving(workdir):
    """Whether an Orbax save is in flight (its temporary directory exists)."""
    directory = workdir / "checkpoints"
    return directory.exists() and any(TMP_MARKER in p.name for p in directory.iterdir())


def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(tmp_path):
    workdir = tmp_path / "run"
    procs, logs = _start(workdir, tmp_path, "first", [f"--config.num_steps={NUM_STEPS}"])
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        # A few steps logged and no save in flight (Orbax always saves a fresh run's first step,
        # whatever every_steps says; let that one finish so it is not mistaken for the stop's).
        while max(_logged_steps(workdir), default=0) < 2 * LOG_EVERY or _saving(workdir):
            if any(p.poll() is not None for p in procs):
                pytest.fail(f"a process exited before training got going:\n{_tails(logs)}")
            if time.monotonic() > deadline:
                pytest.fail(f"no training progress within {START_TIMEOUT_S}s:\n{_tails(logs)}")
            time.sleep(0.05)
        before = _checkpoint_steps(workdir)
        procs[1].send_signal(signal.SIGTERM)  # process 1 only; process 0 learns of it in the allgather
        logged_at_signal = max(_logged_steps(workdir))
        try:
            codes = _wait_all(procs, STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"processes did not stop within {STOP_TIMEOUT_S}s after SIGTERM to process 1 "
                        f"(exit codes {[p.poll() for p in procs]}):\n{_tails(logs)}")
    finally:
        _kill(procs)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], _tails(logs)

    assert all(s < logged_at_signal for s in before), before  # every_steps is huge: no periodic save
    new = sorted(set(_checkpoint_steps(workdir)) - set(before))
    assert len(new) == 1, (before, new, _tails(logs))
    step = new[0]
    assert logged_at_signal <= step < NUM_STEPS and step % LOG_EVERY == 0, (logged_at_signal, step)
    assert f"Stopped at step {step}" in logs[0].read_text()
    assert max(_logged_steps(workdir)) == step  # the last logged step is the saved one

    # Re-run the same 2-process command, a little longer: it resumes from the saved step.
    procs, logs = _start(workdir, tmp_path, "resume", [f"--config.num_steps={step + 2}", "--allow_config_change"])
    try:
        try:
            codes = _wait_all(procs, START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the resumed run did not finish within {START_TIMEOUT_S}s:\n{_tails(logs)}")
    finally:
        _kill(procs)
    assert codes == [0, 0], _tails(logs)
    assert f"Resumed from step {step}" in logs[0].read_text(), _tails(logs)
    steps = _logged_steps(workdir)
    assert steps[-1] == step + 2 and steps.count(step + 2) == 1, steps
    assert _checkpoint_steps(workdir)[-1] == step + 2
