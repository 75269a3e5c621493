r"""Starts N local processes of an experiment script as one multi-process JAX job.

COMMAND:
  python launch/local.py --num_processes=2 --devices_per_process=4 \
      experiments/train.py --config=configs/simclr.py:digits --workdir=runs/mp_digits
  python launch/local.py --num_processes=2 --devices_per_process=4 --dry_run experiments/train.py ...

Each process gets ``--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=I`` appended (the flags experiments/*.py pass to
``clrjax.parallel.initialize_distributed``) and, on CPU, its own
``XLA_FLAGS=--xla_force_host_platform_device_count=K``, so one machine
simulates N hosts with K devices each. With ``--platform=gpu`` process I
instead gets ``--local_device_ids`` for its K GPUs.

CPU collectives across processes use gloo. In jax 0.10.2 gloo is already the
default of ``jax_cpu_collectives_implementation``, and the option is read from
the ``JAX_CPU_COLLECTIVES_IMPLEMENTATION`` environment variable, so setting the
variable (done here) works without touching the script.

Output lines are prefixed ``[pI]``. If one process fails, the others are sent
SIGTERM (then SIGKILL after ``--grace_s``): a peer of a dead process would
otherwise hang in its next collective. SIGTERM/SIGINT to this launcher is
forwarded to every process, so experiments/train.py saves and exits 75.
Signals often come twice (``timeout`` signals its child and then the child's
process group; SLURM signals every process of a step): a repeat is passed on
as SIGKILL only when it is deliberate, i.e. a second Ctrl-C (SIGINT) at least
``DUPLICATE_S`` after the first, or any signal more than ``--repeat_window_s``
after the first; other repeats are ignored, so the runs can save.
Exit status: 0 if all succeeded, else the exit status of the first process to
fail (the cause; the others were stopped by the launcher), 128+N for a signal.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


class LaunchError(ValueError):
    """Bad launcher arguments; the message names the problem and the fix."""


class StopPolicy:
    """Turns the signals this launcher receives into what its processes get: the first one
    SIGTERM (save and exit 75), a deliberate repeat SIGKILL, a duplicate nothing."""

    DUPLICATE_S = 1.0  # repeats closer than this are one request sent twice (timeout, SLURM)

    def __init__(self, repeat_window_s: float = 60.0, clock=time.monotonic):
        self.repeat_window_s = repeat_window_s
        self.clock = clock
        self.first_at: Optional[float] = None
        self.last: Optional[tuple] = None  # (signal, time)

    def on_signal(self, signum: int) -> Optional[int]:
        """The signal to send to every process, or None to send nothing."""
        now = self.clock()
        last, self.last = self.last, (signum, now)
        if self.first_at is None:
            self.first_at = now
            return signal.SIGTERM
        if now - last[1] < self.DUPLICATE_S:
            return None
        if signum == signal.SIGINT and last[0] == signal.SIGINT:
            return signal.SIGKILL  # a second Ctrl-C: no mercy
        if now - self.first_at > self.repeat_window_s:
            return signal.SIGKILL  # still running long after being asked to stop
        return None


@dataclass
class ProcessSpec:
    """One process to start: its argv and the environment variables it adds."""
    process_id: int
    argv: list
    env: dict


# --------------------------------------------------------------------------- commands


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host`` (the OS picks; tiny race until the coordinator binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def xla_flags_with_device_count(existing: str, count: int) -> str:
    """``existing`` XLA_FLAGS with any device-count flag replaced by ``count``."""
    kept = [f for f in existing.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={count}"])


def check_args(num_processes: int, devices_per_process: int, platform: str, script_argv: Sequence[str]) -> None:
    if num_processes < 1:
        raise LaunchError(f"--num_processes is {num_processes}; pass 1 or more.")
    if devices_per_process < 1:
        raise LaunchError(f"--devices_per_process is {devices_per_process}; pass 1 or more.")
    if platform not in ("cpu", "gpu"):
        raise LaunchError(f"--platform is {platform!r}; pass cpu (simulated devices) or gpu.")
    if not script_argv:
        raise LaunchError("no script given; pass it after the launcher flags, "
                          "e.g. launch/local.py --num_processes=2 experiments/train.py --config=...")
    script = script_argv[0]
    if script.endswith(".py") and not os.path.isfile(script):
        raise LaunchError(f"the script {script!r} does not exist; pass a path such as experiments/train.py.")
    for arg in script_argv[1:]:
        if arg.split("=")[0] in ("--coordinator_address", "--num_processes", "--process_id"):
            raise LaunchError(f"the script arguments already contain {arg!r}; "
                              "leave the distributed flags to the launcher.")


def build_specs(script_argv: Sequence[str], num_processes: int, devices_per_process: int,
                platform: str = "cpu", port: Optional[int] = None,
                python: str = sys.executable, base_env: Optional[dict] = None) -> list[ProcessSpec]:
    """The argv and added environment of every process (nothing is started)."""
    check_args(num_processes, devices_per_process, platform, script_argv)
    base_env = os.environ if base_env is None else base_env
    argv0 = [python] + list(script_argv) if script_argv[0].endswith(".py") else list(script_argv)
    specs = []
    port = free_port() if (port is None and num_processes > 1) else port
    for pid in range(num_processes):
        argv, env = list(argv0), {}
        if num_processes > 1:
            argv += [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}",
                     f"--process_id={pid}"]
        if platform == "cpu":
            env["JAX_PLATFORMS"] = "cpu"
            env["XLA_FLAGS"] = xla_flags_with_device_count(base_env.get("XLA_FLAGS", ""), devices_per_process)
            env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
        else:
            first = pid * devices_per_process
            argv.append("--local_device_ids=" + ",".join(str(first + d) for d in range(devices_per_process)))
        specs.append(ProcessSpec(pid, argv, env))
    return specs


def format_spec(spec: ProcessSpec) -> str:
    """A copy-pasteable shell line: ``VAR=value ... python script args``."""
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(spec.env.items()))
    return (env + " " if env else "") + shlex.join(spec.argv)


# --------------------------------------------------------------------------- running


def _stream(proc: subprocess.Popen, prefix: str, lock: threading.Lock, log_file) -> None:
    """Copies a process's merged stdout/stderr to ours, one prefixed line at a time."""
    for line in iter(proc.stdout.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            sys.stdout.flush()
        if log_file is not None:
            log_file.write(line)
            log_file.flush()
    proc.stdout.close()


def _exit_status(returncode: int) -> int:
    """Popen's negative "killed by signal N" as the shell's 128+N."""
    return 128 - returncode if returncode < 0 else returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signals the process group we created for ``proc`` (it may have children)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_specs(specs: Sequence[ProcessSpec], grace_s: float = 10.0, log_dir: Optional[str] = None,
              cwd: Optional[str] = None, repeat_window_s: float = 60.0) -> int:
    """Starts every process, streams their output, returns the job's exit status."""
    lock = threading.Lock()
    procs, threads, logs = [], [], []
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    for spec in specs:
        # A new session per process: Ctrl-C reaches only the launcher, which
        # forwards it once, and killpg also reaches anything the process spawned.
        proc = subprocess.Popen(spec.argv, env=dict(os.environ, **spec.env), cwd=cwd, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, bufsize=1,
                                start_new_session=True)
        log = open(os.path.join(log_dir, f"process_{spec.process_id}.log"), "a") if log_dir else None
        thread = threading.Thread(target=_stream, args=(proc, f"[p{spec.process_id}]", lock, log), daemon=True)
        thread.start()
        procs.append(proc)
        threads.append(thread)
        logs.append(log)

    stop_requests = []
    policy = StopPolicy(repeat_window_s)

    def forward(signum, _frame):
        stop_requests.append(signum)
        sig = policy.on_signal(signum)
        if sig is None:
            # No lock here: the handler runs in the main thread, which may hold it.
            print(f"[launch] signal {signum} again: already stopping, ignored "
                  "(a second Ctrl-C or a later signal kills the processes).", flush=True)
            return
        for p in procs:
            _signal_group(p, sig)

    old_handlers = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure: Optional[tuple] = None
    kill_at = None
    try:
        while any(p.poll() is None for p in procs):
            if first_failure is None:
                for spec, p in zip(specs, procs):
                    if p.poll() not in (None, 0):
                        first_failure = (spec.process_id, _exit_status(p.returncode))
                        break
                if first_failure is not None and not stop_requests and any(q.poll() is None for q in procs):
                    with lock:
                        print(f"[launch] process {first_failure[0]} exited with status {first_failure[1]}; "
                              "stopping the other processes.", flush=True)
                    for q in procs:
                        _signal_group(q, signal.SIGTERM)
                    kill_at = time.monotonic() + grace_s
            if kill_at is not None and time.monotonic() > kill_at:
                for q in procs:
                    _signal_group(q, signal.SIGKILL)
                kill_at = None
            time.sleep(0.1)
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        for t in threads:
            t.join(timeout=5)
        for log in logs:
            if log is not None:
                log.close()
    if first_failure is None:
        statuses = [_exit_status(p.returncode) for p in procs]
        first_failure = next(((i, s) for i, s in enumerate(statuses) if s), (None, 0))
    return first_failure[1]


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run an experiment script as N local JAX processes (multi-host on one machine).")
    parser.add_argument("--num_processes", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--devices_per_process", type=int, default=1,
                        help="CPU: simulated devices per process; GPU: GPUs per process")
    parser.add_argument("--platform", default="cpu", help="cpu (simulated devices) or gpu")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others after a failure")
    parser.add_argument("--repeat_window_s", type=float, default=60.0,
                        help="a repeated SIGTERM within this many seconds of the first is a duplicate and "
                             "ignored; later, or a second Ctrl-C, kills the processes (default 60)")
    parser.add_argument("--log_dir", default=None, help="also write each process's output to LOG_DIR/process_I.log")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, start nothing")
    parser.add_argument("script", nargs=argparse.REMAINDER, help="script and its arguments")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    script = args.script[1:] if args.script[:1] == ["--"] else args.script
    try:
        specs = build_specs(script, args.num_processes, args.devices_per_process, args.platform, args.port)
    except LaunchError as err:
        print(f"launch/local.py: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for spec in specs:
            print(format_spec(spec))
        return 0
    if args.repeat_window_s < 0:
        print(f"launch/local.py: --repeat_window_s is {args.repeat_window_s}; pass 0 or more seconds.",
              file=sys.stderr)
        return 2
    return run_specs(specs, grace_s=args.grace_s, log_dir=args.log_dir, repeat_window_s=args.repeat_window_s)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
