"""launch/slurm.sbatch and launch/sweep.py --emit=slurm under a real SLURM (Debian's slurm-wlm).

The module starts its own one-node cluster in a temporary directory: slurmctld and
slurmd as this test's child processes, auth/none, the node's CPUs as `slurmd -C`
reports them, free ports, and stops them at the end. .ci/run installs slurm-wlm;
where it is missing or cannot start (not root, no binaries) every test skips and says why.

Two things are sped up by the test and only those: SLURM holds a requeued job for
120 s (its BeginTime) and `scontrol update StartTime=now` lets it start at once; and
the time limit is shortened with `scontrol update TimeLimit=2` so that the script's
``--signal=TERM@120`` falls due immediately (slurmctld checks time limits every
~30 s, so the signal arrives within half a minute).
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass

import numpy as np
import pytest
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(ROOT, "launch", "slurm.sbatch")
SWEEP = os.path.join(ROOT, "launch", "sweep.py")
LOCAL = os.path.join(ROOT, "launch", "local.py")
TRAIN = os.path.join(ROOT, "experiments", "train.py")
DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "sinfo")
START_TIMEOUT_S = 30
NUM_STEPS = 300
LOG_EVERY = 2
TINY = [  # as tests/test_multiprocess_preemption.py: seconds of compilation, milliseconds a step
    "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits",
    "--config.model.widths=(8,16,16,16)", "--config.projector.hidden_dims=(32,)",
    "--config.projector.out_dim=16", "--config.batch_size=64",
    f"--config.log_every_steps={LOG_EVERY}", "--config.checkpoint.every_steps=100000",
    "--config.optimizer.warmup_epochs=0", "--config.eval.final=False", f"--config.num_steps={NUM_STEPS}",
]
# Resources of the test node instead of the script's GPU defaults (command-line options win
# over #SBATCH lines); two tasks of one CPU each, as two JAX processes of one CPU device.
CPU_JOB = ["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=10"]


# --------------------------------------------------------------------------- the cluster


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unavailable() -> str:
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"slurm-wlm is not installed (no {', '.join(missing)}); .ci/run installs it with apt-get as root"
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; run the tests as root (as CI does)"
    return ""


def _node_line(host: str) -> str:
    """NodeName line from `slurmd -C` (what slurmd will report), memory kept small."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    cpus = re.search(r"CPUs=(\d+)", out)
    return f"NodeName={host} CPUs={cpus.group(1) if cpus else 1} RealMemory=1000 State=UNKNOWN"


SLURM_CONF = """\
ClusterName=clrjaxtest
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
MpiDefault=none
ReturnToService=2
KillWait=30
JobRequeue=1
{node}
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Cluster:
    dir: str
    env: dict

    def run(self, *cmd, check=True, cwd=ROOT) -> str:
        proc = subprocess.run(list(cmd), env=self.env, cwd=cwd, capture_output=True, text=True, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as key=value pairs (of the first record)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        first = out.splitlines()[0] if out.strip() else ""
        return dict(re.findall(r"(\w+)=(\S*)", first))

    def daemon_logs(self) -> str:
        tails = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                tails.append(f"--- {name}:\n" + open(path).read()[-2000:])
        return "\n".join(tails)


def _job_env(directory: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=os.path.join(directory, "slurm.conf"), PYTHON=sys.executable,
               CLRJAX_PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(1), JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo")
    return env


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    directory = str(tmp_path_factory.mktemp("slurm"))
    for sub in ("state", "spool"):
        os.makedirs(os.path.join(directory, sub))
    host = socket.gethostname().split(".")[0]
    with open(os.path.join(directory, "slurm.conf"), "w") as f:
        f.write(SLURM_CONF.format(host=host, dir=directory, ctld_port=_free_port(), slurmd_port=_free_port(),
                                  node=_node_line(host)))
    cluster = Cluster(directory, _job_env(directory))
    daemons = [subprocess.Popen([name, "-D", *extra], env=cluster.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
               for name, extra in (("slurmctld", ["-i"]), ("slurmd", []))]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "idle" not in cluster.run("sinfo", "-h", "-o", "%T", check=False):
            if time.monotonic() > deadline or any(d.poll() is not None for d in daemons):
                pytest.skip(f"the test SLURM did not start within {START_TIMEOUT_S}s:\n{cluster.daemon_logs()}")
            time.sleep(0.5)
        cluster.version = cluster.run("sinfo", "-V").strip()
        yield cluster
    finally:
        cluster.run("scancel", "--full", "--user=root", check=False)
        for daemon in daemons:
            daemon.terminate()
        for daemon in daemons:
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


# --------------------------------------------------------------------------- helpers


def _sbatch(cluster, *args) -> str:
    return cluster.run("sbatch", "--parsable", *args).strip().split(";")[0]


def _wait(what, condition, timeout, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s\n{details()}")
        time.sleep(0.5)


def _release_if_held(cluster, job_id, info):
    """SLURM holds a requeued job for 120 s (Reason=BeginTime); let it start now."""
    if int(info.get("Restarts", 0)) > 0 and info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
        cluster.run("scontrol", "update", f"JobId={job_id}", "StartTime=now", check=False)


def _requeued(cluster, job_id, restarts=1):
    info = cluster.job(job_id)
    _release_if_held(cluster, job_id, info)
    return int(info.get("Restarts", 0)) >= restarts


def _finished(cluster, job_id):
    info = cluster.job(job_id)
    _release_if_held(cluster, job_id, info)
    return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None


def _logged_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    steps = []
    if os.path.exists(path):
        for line in open(path).read().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass  # a line being written right now
    return steps


def _saving(workdir):
    from clrjax.checkpoint import TMP_MARKER
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and any(TMP_MARKER in p for p in os.listdir(directory))


def _checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(p) for p in os.listdir(directory) if p.isdigit()) if os.path.isdir(directory) else []


def _saved_state(workdir, step):
    from clrjax.checkpoint import Checkpointer
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    try:
        return checkpointer.restore_subtree(step)
    finally:
        checkpointer.close()


def _assert_bit_identical(a, b):
    import jax
    flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
    flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
    assert len(flat_a) == len(flat_b) and flat_a
    for path, x in flat_a:
        np.testing.assert_array_equal(np.asarray(x), np.asarray(flat_b[path]), err_msg=jax.tree_util.keystr(path))


def _both_tasks_exited_75(log):
    """srun reports "tasks 0-1: Exited with exit code 75", or one line per task when they end apart;
    a task killed after the other's exit ("task 1: Terminated") is what --kill-on-bad-exit=1 did."""
    if "tasks 0-1: Exited with exit code 75" in log:
        return True
    return all(f"task {t}: Exited with exit code 75" in log for t in "01") and "Terminated" not in log


def _read(path):
    return open(path).read() if os.path.exists(path) else ""


# --------------------------------------------------------------------------- slurm.sbatch


@pytest.mark.slow  # 3-7 min on 2 loaded cores; the stand-in-task tests below cover the signal path
def test_preempted_job_saves_requeues_resumes_and_ends_bit_identical(slurm, tmp_path):
    """scancel --signal=TERM reaches the tasks as the script's --signal does: 75, requeue, resume."""
    workdir, reference = str(tmp_path / "run"), str(tmp_path / "reference")
    output = str(tmp_path / "job.out")
    # The same 2 processes x 1 CPU device, never interrupted (launch/local.py), alongside the job.
    ref = subprocess.Popen([sys.executable, LOCAL, "--num_processes=2", "--devices_per_process=1", TRAIN,
                            f"--workdir={reference}", *TINY], env=slurm.env, cwd=ROOT,
                           stdout=open(tmp_path / "reference.log", "w"), stderr=subprocess.STDOUT)
    try:
        job = _sbatch(slurm, *CPU_JOB, f"--output={output}", SBATCH, TRAIN, f"--workdir={workdir}", *TINY)
        details = lambda: f"{_read(output)[-4000:]}\n{slurm.job(job)}"  # noqa: E731
        # A few steps done and no save in flight (a fresh run always saves its first step).
        _wait("the job did not start training",
              lambda: max(_logged_steps(workdir), default=0) >= 2 * LOG_EVERY and not _saving(workdir),
              240, details)
        slurm.run("scancel", "--signal=TERM", job)
        stopped_at = max(_logged_steps(workdir))
        _wait("the job was not requeued", lambda: _requeued(slurm, job), 120, details)
        info = _wait("the requeued job did not finish", lambda: _finished(slurm, job), 240, details)
        ref.wait(timeout=300)
    finally:
        if ref.poll() is None:
            ref.kill()
    log = _read(output)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", details()
    assert _both_tasks_exited_75(log), log
    assert "requeueing job" in log and "(restart 1)" in log, log
    saved = [s for s in _checkpoint_steps(workdir) if 0 < s < NUM_STEPS]
    assert saved and saved[-1] >= stopped_at, (saved, stopped_at)
    assert f"Resumed from step {saved[-1]}" in log, log
    assert ref.returncode == 0, _read(tmp_path / "reference.log")[-3000:]
    _assert_bit_identical(_saved_state(workdir, NUM_STEPS), _saved_state(reference, NUM_STEPS))


FAKE_TASK = textwrap.dedent("""
    import os, signal, sys, time
    out = sys.argv[1]
    task = os.environ["SLURM_PROCID"]
    if os.environ.get("SLURM_RESTART_COUNT", "0") != "0":
        open(f"{out}/resumed-{task}", "w").close()
        sys.exit(0)
    def stop(signum, _frame):
        open(f"{out}/signalled-{task}", "w").write(str(signum))
        # Then a process winds down with SIGTERM at its default action (how train.py's task 1
        # died as "Terminated" when srun --kill-on-bad-exit=1 reacted to task 0's 75);
        # task 1 is still at it when task 0 exits.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(1.0 + 2.0 * int(task))
        open(f"{out}/saved-{task}", "w").close()
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    open(f"{out}/up-{task}", "w").close()
    time.sleep(300)
""")


def test_signal_directive_reaches_every_task_and_the_job_requeues(slurm, tmp_path):
    """#SBATCH --signal=TERM@120 at the (shortened) time limit: SIGTERM to both tasks, not SIGKILL."""
    script = tmp_path / "task.py"
    script.write_text(FAKE_TASK)
    output = str(tmp_path / "job.out")
    job = _sbatch(slurm, *CPU_JOB, f"--output={output}", SBATCH, str(script), str(tmp_path))
    details = lambda: f"{_read(output)}\n{slurm.job(job)}\n{slurm.daemon_logs()}"  # noqa: E731
    _wait("the tasks did not start", lambda: all((tmp_path / f"up-{t}").exists() for t in "01"), 60, details)
    slurm.run("scontrol", "update", f"JobId={job}", "TimeLimit=2")  # now within 120 s of the end
    _wait("the job was not requeued", lambda: _requeued(slurm, job), 90, details)
    info = _wait("the requeued job did not finish", lambda: _finished(slurm, job), 60, details)
    assert info["JobState"] == "COMPLETED", details()
    for task in "01":
        assert (tmp_path / f"signalled-{task}").read_text() == "15"  # SIGTERM itself, to each task
        assert (tmp_path / f"saved-{task}").exists()  # not killed when the other task exited first
        assert (tmp_path / f"resumed-{task}").exists()
    assert "SIGTERM to the batch shell" not in _read(output)  # no B:, the shell was not signalled


def test_sigterm_to_the_batch_shell_alone_still_saves(slurm, tmp_path):
    """scancel -b: the trap asks SLURM to signal the tasks, never srun (which would SIGKILL them)."""
    script = tmp_path / "task.py"
    script.write_text(FAKE_TASK)
    output = str(tmp_path / "job.out")
    job = _sbatch(slurm, *CPU_JOB, f"--output={output}", SBATCH, str(script), str(tmp_path))
    details = lambda: f"{_read(output)}\n{slurm.job(job)}"  # noqa: E731
    _wait("the tasks did not start", lambda: all((tmp_path / f"up-{t}").exists() for t in "01"), 60, details)
    slurm.run("scancel", "--batch", "--signal=TERM", job)
    _wait("the job was not requeued", lambda: _requeued(slurm, job), 60, details)
    info = _wait("the requeued job did not finish", lambda: _finished(slurm, job), 60, details)
    log = _read(output)
    assert info["JobState"] == "COMPLETED", details()
    assert "SIGTERM to the batch shell" in log and _both_tasks_exited_75(log), log
    assert all((tmp_path / f"signalled-{t}").read_text() == "15" for t in "01")
    assert all((tmp_path / f"saved-{t}").exists() for t in "01")


# --------------------------------------------------------------------------- sweep arrays


FAKE_RUN = textwrap.dedent("""
    # Stands in for experiments/train.py: saves on SIGTERM and exits 75, resumes when re-run.
    import os, signal, sys, time
    workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
    os.makedirs(workdir, exist_ok=True)
    saved = os.path.join(workdir, "saved")
    if os.path.exists(saved):
        open(os.path.join(workdir, "finished"), "w").write(open(saved).read())
        print("Resumed and finished", flush=True)
        sys.exit(0)
    def stop(signum, _frame):
        time.sleep(1.0)  # saving takes a moment
        open(saved, "w").write(" ".join(sys.argv[1:]))
        print("saved", flush=True)
        sys.exit(75)
    signal.signal(signal.SIGTERM, stop)
    open(os.path.join(workdir, "up"), "w").close()
    time.sleep(300)
""")


def _emit_array(cluster, tmp_path, script):
    sweep_file = tmp_path / "three.py"
    sweep_file.write_text("def get_sweep():\n    return [{'loss.temperature': t} for t in (0.1, 0.2, 0.5)]\n")
    root = tmp_path / "sweep"
    cmd = [sys.executable, SWEEP, "run", str(sweep_file), "--config=configs/simclr.py:digits",
           f"--workdir={root}", "--emit=slurm", "--parallel=3", f"--script={script}",
           "--slurm_gpus_per_node=0", "--slurm_cpus_per_task=1", "--slurm_time=10"]
    if script == TRAIN:
        cmd.append("--extra=" + " ".join(a for a in TINY[1:] if not a.startswith("--config=")))
    proc = subprocess.run(cmd, cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = sorted(json.loads((root / "sweep.json").read_text())["runs"])
    return root, names


def _array_runs(root):
    """The run names of the array script, in array-task order."""
    text = (root / "sweep_array.sbatch").read_text()
    return shlex.split(re.search(r"^RUNS=\((.*)\)$", text, flags=re.M).group(1))


def test_sweep_array_tasks_save_requeue_and_resume(slurm, tmp_path):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_RUN)
    root, names = _emit_array(slurm, tmp_path, str(script))
    job = _sbatch(slurm, str(root / "sweep_array.sbatch"))
    array = {f"{job}_{i}": root / name for i, name in enumerate(_array_runs(root))}
    details = lambda: "\n".join(f"{t}: {slurm.job(t)}\n{_read(root / f'slurm-{t}.out')}" for t in array)  # noqa
    signalled = set()

    def progress():
        for task, workdir in array.items():
            if task not in signalled and (workdir / "up").exists():
                # One task through its batch shell (the trap), the others as --signal would.
                how = ["--batch"] if task.endswith("_0") else []
                slurm.run("scancel", *how, "--signal=TERM", task, check=False)
                signalled.add(task)
            if task in signalled:
                _requeued(slurm, task)
        return all(_finished(slurm, task) for task in array)

    _wait("the array did not finish", progress, 240, details)
    for task, workdir in array.items():
        info = slurm.job(task)
        assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, details()
        status = json.loads((workdir / "status.json").read_text())
        assert status["status"] == "done" and status["exit_code"] == 0, status
        assert "--config.loss.temperature=" in (workdir / "finished").read_text()  # its own overrides
        assert "saved" in _read(workdir / "log.txt") and "Resumed and finished" in _read(workdir / "log.txt")
    assert sorted(w.name for w in array.values()) == names


@pytest.mark.slow
def test_sweep_array_of_real_runs_resumes_bit_identical(slurm, tmp_path):
    """Three real runs of experiments/train.py, each stopped and requeued, vs. the same runs uninterrupted."""
    root, names = _emit_array(slurm, tmp_path, TRAIN)
    job = _sbatch(slurm, str(root / "sweep_array.sbatch"))
    tasks = {f"{job}_{i}": str(root / name) for i, name in enumerate(_array_runs(root))}
    details = lambda: "\n".join(f"{t}: {slurm.job(t)}\n{_read(os.path.join(w, 'log.txt'))[-2000:]}"  # noqa
                                for t, w in tasks.items())
    signalled = set()

    def progress():
        for task, workdir in tasks.items():
            if task not in signalled and max(_logged_steps(workdir), default=0) >= 2 * LOG_EVERY \
                    and not _saving(workdir):
                slurm.run("scancel", "--signal=TERM", task, check=False)
                signalled.add(task)
            if task in signalled:
                _requeued(slurm, task)
        return all(_finished(slurm, task) for task in tasks)

    _wait("the array did not finish", progress, 900, details)
    for task, workdir in tasks.items():
        info = slurm.job(task)
        assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, details()
        run = json.loads(open(os.path.join(workdir, "status.json")).read())
        reference = os.path.join(str(tmp_path), "reference", os.path.basename(workdir))
        argv = [a.replace(workdir, reference) for a in shlex.split(run["command"])]
        env = dict(slurm.env, XLA_FLAGS=xla_flags(1))
        subprocess.run(argv, env=env, cwd=ROOT, check=True, capture_output=True, timeout=600)
        _assert_bit_identical(_saved_state(workdir, NUM_STEPS), _saved_state(reference, NUM_STEPS))

