"""launch/local.py, launch/slurm.sbatch and launch/tpu_pod.sh without training anything."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL = os.path.join(ROOT, "launch", "local.py")
SLURM = os.path.join(ROOT, "launch", "slurm.sbatch")
TPU = os.path.join(ROOT, "launch", "tpu_pod.sh")
TRAIN = os.path.join(ROOT, "experiments", "train.py")


# --------------------------------------------------------------------------- local.py: commands


def test_specs_give_each_process_its_id_and_one_coordinator():
    specs = local.build_specs([TRAIN, "--workdir=/tmp/x"], num_processes=2, devices_per_process=4,
                              base_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert [s.process_id for s in specs] == [0, 1]
    coordinators = {a for s in specs for a in s.argv if a.startswith("--coordinator_address=127.0.0.1:")}
    assert len(coordinators) == 1
    for spec in specs:
        assert spec.argv[1:3] == [TRAIN, "--workdir=/tmp/x"]
        assert f"--process_id={spec.process_id}" in spec.argv and "--num_processes=2" in spec.argv
        # the caller's device count is replaced, its other XLA flags kept
        assert spec.env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
        assert spec.env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
        assert spec.env["JAX_PLATFORMS"] == "cpu"


def test_gpu_processes_get_disjoint_local_devices():
    specs = local.build_specs([TRAIN], num_processes=2, devices_per_process=2, platform="gpu", port=1234)
    ids = [next(a for a in s.argv if a.startswith("--local_device_ids=")) for s in specs]
    assert ids == ["--local_device_ids=0,1", "--local_device_ids=2,3"]
    assert all("XLA_FLAGS" not in s.env for s in specs)


def test_one_process_gets_no_distributed_flags():
    (spec,) = local.build_specs([TRAIN], num_processes=1, devices_per_process=8)
    assert not any(a.startswith("--coordinator_address") for a in spec.argv)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_processes=0), "--num_processes"),
    (dict(devices_per_process=0), "--devices_per_process"),
    (dict(platform="tpu"), "--platform"),
    (dict(script_argv=["nope/missing.py"]), "does not exist"),
    (dict(script_argv=[TRAIN, "--process_id=1"]), "leave the distributed flags"),
    (dict(script_argv=[]), "no script given"),
])
def test_bad_launcher_arguments_fail_with_one_sentence(kwargs, message):
    args = dict(script_argv=[TRAIN], num_processes=2, devices_per_process=1, platform="cpu")
    args.update(kwargs)
    with pytest.raises(local.LaunchError, match=message):
        local.build_specs(**args)


def test_dry_run_prints_one_copy_pasteable_line_per_process():
    # The launcher keeps the caller's other XLA flags; without any, the line is the launcher's own.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, LOCAL, "--num_processes=2", "--devices_per_process=4", "--dry_run",
                           TRAIN, "--config=configs/simclr.py:digits", "--workdir=/tmp/run"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 2
    for i, line in enumerate(lines):
        assert line.startswith("JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo JAX_PLATFORMS=cpu "
                               "XLA_FLAGS=--xla_force_host_platform_device_count=4 ")
        assert "--config=configs/simclr.py:digits --workdir=/tmp/run --coordinator_address=127.0.0.1:" in line
        assert line.endswith(f"--num_processes=2 --process_id={i}")


def test_dry_run_reports_bad_arguments_with_status_2():
    proc = subprocess.run([sys.executable, LOCAL, "--num_processes=0", "--dry_run", TRAIN],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--num_processes is 0" in proc.stderr


# --------------------------------------------------------------------------- local.py: running


FAKE_WORKER = textwrap.dedent("""
    import signal, sys, time
    pid = int([a for a in sys.argv if a.startswith("--process_id=")][0].split("=")[1])
    mode = sys.argv[1]
    signal.signal(signal.SIGTERM, lambda *_: (print("saving", flush=True), sys.exit(75)))
    print(f"hello from {pid}", flush=True)
    if mode == "fail" and pid == 1:
        time.sleep(1.0)  # let process 0 install its handler first
        sys.exit(7)
    if mode == "ok":
        sys.exit(0)
    time.sleep(60)  # the launcher must stop us
""")


@pytest.fixture
def fake_worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(FAKE_WORKER)
    return str(path)


def test_all_processes_succeed_and_output_is_prefixed(fake_worker, capfd):
    specs = local.build_specs([fake_worker, "ok"], num_processes=2, devices_per_process=1)
    assert local.run_specs(specs) == 0
    out = capfd.readouterr().out
    assert "[p0] hello from 0" in out and "[p1] hello from 1" in out


def test_a_failure_stops_the_others_and_its_status_is_returned(fake_worker, capfd):
    specs = local.build_specs([fake_worker, "fail"], num_processes=2, devices_per_process=1)
    start = time.monotonic()
    assert local.run_specs(specs, grace_s=5) == 7
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for
    out = capfd.readouterr().out
    assert "process 1 exited with status 7; stopping the other processes" in out
    assert "[p0] saving" in out  # it got SIGTERM (its chance to checkpoint) before any SIGKILL


def test_sigterm_to_the_launcher_reaches_every_process(fake_worker):
    launcher = subprocess.Popen([sys.executable, LOCAL, "--num_processes=2", fake_worker, "wait"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in launcher.stdout:  # both processes are up once both said hello
        seen.append(line)
        if sum("hello from" in l for l in seen) == 2:
            break
    launcher.send_signal(signal.SIGTERM)
    out = launcher.communicate(timeout=30)[0]
    assert launcher.returncode == 75  # preempted: re-run to resume
    assert out.count("saving") == 2


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


@pytest.mark.parametrize("signals, expected", [
    # (signal, seconds after the previous one) -> what every process gets
    ([("TERM", 0)], ["TERM"]),
    ([("TERM", 0), ("TERM", 0.001)], ["TERM", None]),          # timeout: child, then its group
    ([("TERM", 0), ("TERM", 5), ("TERM", 20)], ["TERM", None, None]),  # within the repeat window
    ([("TERM", 0), ("TERM", 61)], ["TERM", "KILL"]),           # still running a minute later
    ([("INT", 0), ("INT", 2)], ["INT->TERM", "KILL"]),         # a second Ctrl-C
    ([("INT", 0), ("INT", 0.01)], ["INT->TERM", None]),        # one Ctrl-C delivered twice
    ([("TERM", 0), ("INT", 2)], ["TERM", None]),               # Ctrl-C after a preemption signal
])
def test_only_a_deliberate_repeat_escalates_to_sigkill(signals, expected):
    clock = FakeClock()
    policy = local.StopPolicy(repeat_window_s=60, clock=clock)
    names = {None: None, signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}
    got = []
    for (name, delay), want in zip(signals, expected):
        clock.now += delay
        sent = names[policy.on_signal(getattr(signal, "SIG" + name))]
        got.append("INT->TERM" if (name == "INT" and sent == "TERM") else sent)
    assert got == expected


SAVING_WORKER = textwrap.dedent("""
    import os, signal, sys, time
    workdir = sys.argv[1]
    def save(*_):
        print("saving", flush=True)
        time.sleep(2.0)  # a checkpoint takes a while; a SIGKILL now would lose it
        open(os.path.join(workdir, "checkpoint"), "w").write("saved")
        sys.exit(75)
    signal.signal(signal.SIGTERM, save)
    print("hello", flush=True)
    time.sleep(60)
""")


def test_duplicate_sigterm_to_launcher_and_its_group_saves_and_exits_75(tmp_path):
    """What `timeout 540 python launch/local.py ...` does: SIGTERM to the child, then to its group."""
    worker = tmp_path / "worker.py"
    worker.write_text(SAVING_WORKER)
    launcher = subprocess.Popen([sys.executable, LOCAL, "--num_processes=1", str(worker), str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    for line in launcher.stdout:
        if "hello" in line:
            break
    launcher.send_signal(signal.SIGTERM)
    time.sleep(0.3)  # apart enough to reach the handler twice (not merged), well inside DUPLICATE_S
    os.killpg(launcher.pid, signal.SIGTERM)
    out = launcher.communicate(timeout=30)[0]
    assert launcher.returncode == 75, out
    assert (tmp_path / "checkpoint").read_text() == "saved"
    assert "already stopping, ignored" in out


# --------------------------------------------------------------------------- cluster scripts


@pytest.mark.parametrize("script", [SLURM, TPU])
def test_cluster_scripts_parse(script):
    subprocess.run(["bash", "-n", script], check=True)


def _bash(script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU"))}
    full_env.update(env or {})
    return subprocess.run(["bash", script, *args], capture_output=True, text=True, env=full_env, timeout=60)


def test_slurm_dry_run_one_process_per_node_drives_all_gpus():
    proc = _bash(SLURM, "experiments/train.py", "--config=configs/simclr.py:imagenet", "--workdir=/shared/r",
                 env={"DRY_RUN": "1", "SLURM_GPUS_ON_NODE": "4"})
    assert proc.returncode == 0, proc.stderr
    assert ("srun --kill-on-bad-exit=0 --wait=120 --ntasks-per-node=1 python experiments/train.py "
            "--config=configs/simclr.py:imagenet --workdir=/shared/r --local_device_ids=0,1,2,3") in proc.stdout
    assert "scontrol requeue" in proc.stdout


def test_slurm_dry_run_one_process_per_gpu_leaves_devices_to_jax():
    proc = _bash(SLURM, "experiments/train.py", "--workdir=/shared/r",
                 env={"DRY_RUN": "1", "SLURM_NTASKS_PER_NODE": "8"})
    assert proc.returncode == 0, proc.stderr
    assert "srun --kill-on-bad-exit=0 --wait=120 --ntasks-per-node=8 python experiments/train.py --workdir=/shared/r" in proc.stdout
    assert "--local_device_ids" not in proc.stdout


def test_slurm_script_header_requeues_and_signals_the_tasks_themselves():
    text = open(SLURM).read()
    for directive in ("#SBATCH --requeue", "#SBATCH --signal=TERM@120", "#SBATCH --open-mode=append"):
        assert directive in text
    # B: would signal only this shell, and srun turns a SIGTERM into SIGKILL of its tasks.
    assert "B:TERM" not in text and 'kill -TERM "$SRUN_PID"' not in text


def test_slurm_refuses_explicit_distributed_flags():
    proc = _bash(SLURM, "experiments/train.py", "--process_id=0", env={"DRY_RUN": "1"})
    assert proc.returncode == 2 and "--process_id=0" in proc.stderr


def test_tpu_dry_run_runs_the_command_on_every_worker():
    proc = _bash(TPU, "run", "experiments/train.py", "--config=configs/simclr.py:imagenet", "--workdir=/mnt/r",
                 env={"DRY_RUN": "1", "TPU": "my-pod", "ZONE": "us-central2-b"})
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("gcloud compute tpus tpu-vm ssh my-pod --zone=us-central2-b --worker=all ")
    # Nothing but the command: every worker finds the others from the TPU metadata (clrjax.clusters).
    assert line.endswith("'--command=cd clrjax && .venv/bin/python experiments/train.py "
                         "--config=configs/simclr.py:imagenet --workdir=/mnt/r'")
    assert "TPU_WORKER_HOSTNAMES" not in line


def test_tpu_dry_run_setup_copies_and_installs_on_every_worker():
    proc = _bash(TPU, "setup", env={"DRY_RUN": "1", "TPU": "my-pod", "ZONE": "z", "PROJECT": "proj"})
    assert proc.returncode == 0, proc.stderr
    assert "gcloud compute tpus tpu-vm scp" in proc.stdout and "--worker=all" in proc.stdout
    assert "pip install" in proc.stdout and "--project=proj" in proc.stdout
    # jax 0.10.2 needs Python >= 3.11: the workers get a venv of it from uv, whatever python3 is.
    assert "uv venv -q --allow-existing --python 3.11 .venv" in proc.stdout
    assert "uv pip install -q --python .venv/bin/python -e . 'jax[tpu]'" in proc.stdout.replace("'\\''", "'")


def test_tpu_script_names_the_missing_variable():
    proc = _bash(TPU, "run", "experiments/train.py", env={"DRY_RUN": "1", "ZONE": "z"})
    assert proc.returncode != 0 and "set TPU=" in proc.stderr
