"""The signal handling of launch/slurm.sbatch and of sweep.py's array script, with stand-in SLURM commands.

tests/test_slurm_real.py runs both under a real SLURM where slurm-wlm can start; these
run everywhere in seconds. The stand-in `srun` behaves as the real one does where it
matters (slurm-wlm 22.05, seen in issue 16): it answers SIGTERM by SIGKILLing its task
("forcing job termination"), and exits with the task's status. `scancel --signal=TERM`
without --batch signals the task (not the batch shell); `scontrol` only records.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
SWEEP = os.path.join(ROOT, "launch", "sweep.py")

FAKE_SRUN = """#!/bin/bash
while [[ "$1" == --* ]]; do shift; done
"$@" &
task=$!
echo "$task" > "$FAKE_SLURM/task.pid"
killed=0
trap 'echo "srun: forcing job termination"; killed=1; kill -KILL "$task"' TERM
wait "$task"; rc=$?
if [ "$killed" = 1 ]; then wait "$task"; rc=$?; fi
exit "$rc"
"""
FAKE_SCANCEL = """#!/bin/bash
echo "scancel $*" >> "$FAKE_SLURM/calls"
case " $* " in *" --batch "*|*" -b "*) exit 0;; esac
kill -TERM "$(cat "$FAKE_SLURM/task.pid")"
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$FAKE_SLURM/calls"
"""
TASK = textwrap.dedent("""
    import os, signal, sys, time
    workdir = ([a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")] or [sys.argv[1]])[0]
    os.makedirs(workdir, exist_ok=True)
    def save(*_):
        time.sleep(0.5)
        open(os.path.join(workdir, "saved"), "w").close()
        sys.exit(75)
    signal.signal(signal.SIGTERM, save)
    open(os.path.join(workdir, "up"), "w").close()
    time.sleep(120)
""")


@pytest.fixture
def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scancel", FAKE_SCANCEL), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "task.py").write_text(TASK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", FAKE_SLURM=str(tmp_path), PYTHON=sys.executable,
               CLRJAX_PYTHON=sys.executable, SLURM_JOB_ID="42", SLURM_NTASKS_PER_NODE="2")
    return tmp_path, env


def _start(argv, env, up_file, timeout=60):
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + timeout
    while not up_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the task did not start:\n{proc.communicate()[0]}")
        time.sleep(0.05)
    return proc


def _calls(tmp_path):
    path = tmp_path / "calls"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("who", ["batch shell", "task"])
def test_sbatch_script_saves_and_requeues_whoever_gets_the_signal(fake_slurm, who):
    tmp_path, env = fake_slurm
    run_dir = tmp_path / "run"
    proc = _start(["bash", SBATCH, str(tmp_path / "task.py"), str(run_dir)], env, run_dir / "up")
    if who == "batch shell":  # scancel -b, some preemption setups
        proc.send_signal(signal.SIGTERM)
    else:                     # --signal=TERM@120 without B:, scancel --signal=TERM
        os.kill(int((tmp_path / "task.pid").read_text()), signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 75, out
    assert (run_dir / "saved").exists() and "forcing job termination" not in out  # srun was never signalled
    assert "scontrol requeue 42" in _calls(tmp_path)
    assert ("scancel --signal=TERM 42" in _calls(tmp_path)) is (who == "batch shell")


def test_sbatch_script_passes_a_failure_on_without_requeueing(fake_slurm):
    tmp_path, env = fake_slurm
    (tmp_path / "fail.py").write_text("import sys; sys.exit(3)")
    proc = subprocess.run(["bash", SBATCH, str(tmp_path / "fail.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and _calls(tmp_path) == []


def test_sweep_array_task_records_the_runs_status_and_requeues(fake_slurm):
    """Was: the trap's `wait` gave 143, so a run that saved (75) ended FAILED, never requeued."""
    tmp_path, env = fake_slurm
    sweep_file = tmp_path / "one.py"
    sweep_file.write_text("def get_sweep():\n    return [{'loss.temperature': 0.3}]\n")
    root = tmp_path / "sweep"
    emit = subprocess.run([sys.executable, SWEEP, "run", str(sweep_file), "--config=configs/simclr.py:digits",
                           f"--workdir={root}", "--emit=slurm", f"--script={tmp_path / 'task.py'}",
                           "--slurm_gpus_per_node=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert emit.returncode == 0, emit.stderr
    (name,) = json.loads((root / "sweep.json").read_text())["runs"]
    env = dict(env, SLURM_ARRAY_JOB_ID="7", SLURM_ARRAY_TASK_ID="0")
    proc = _start(["bash", str(root / "sweep_array.sbatch")], env, root / name / "up", timeout=120)
    proc.send_signal(signal.SIGTERM)  # the batch shell: its trap has SLURM signal the step
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 75, out
    assert "scancel --signal=TERM 7_0" in _calls(tmp_path) and "scontrol requeue 7_0" in _calls(tmp_path)
    status = json.loads((root / name / "status.json").read_text())
    assert status["status"] == "preempted" and status["exit_code"] == 75
