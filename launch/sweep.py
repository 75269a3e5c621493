r"""Hyper-parameter sweeps: expand a sweep file into runs, launch them, collect the results.

COMMAND:
  python launch/sweep.py run launch/sweeps/simclr_digits_temp_lr.py \
      --config=configs/simclr.py:digits --workdir=runs/sweep_temp_lr --parallel=2 \
      [--extra='--config.num_epochs=20'] [--dry_run] [--emit=local|slurm|tpu]
  python launch/sweep.py collect runs/sweep_temp_lr [--metric=pretrained.linear_top1] [--mode=max]

A sweep file is Python with ``get_sweep()`` returning a list of dicts of
dotted config keys, one dict per run (build them with ``launch/hyper.py``).
Everything is checked before anything starts: the file, each entry, and each
key against the config (``clrjax.config.apply_overrides``). Value checks that
need the model or data (``validate_config``) happen in the run itself, so a
bad value fails that run only; its status is recorded and the others go on.

Each run lives in ``ROOT/<sweep>-<key>=<value>-...`` and gets
``status.json`` (status, exit code, overrides, command, error) and ``log.txt``.
Re-running the same ``run`` command skips finished runs and re-runs the rest,
which resumes them from their checkpoints (the resume path after preemption).
``collect`` writes ROOT/results.csv, ROOT/results.md and ROOT/results.png.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # sweep files import `launch.hyper`; clrjax may not be installed
    sys.path.insert(0, ROOT)

from clrjax import config as config_lib  # noqa: E402  (needs the path above)

TRAIN_SCRIPT = os.path.join("experiments", "train.py")
MANIFEST = "sweep.json"
STATUS = "status.json"
LOG = "log.txt"
MAX_NAME_CHARS = 150
EXIT_MEANING = {0: "done", 3: "failed: config error", 4: "failed: non-finite values",
                75: "preempted: re-run to resume"}


class SweepError(ValueError):
    """A sweep file, its entries or the sweep command line are invalid; the message says how to fix it."""


@dataclass
class Run:
    """One planned run: its directory name, overrides and command line."""
    name: str
    workdir: str
    overrides: dict
    argv: list = field(default_factory=list)


# --------------------------------------------------------------------------- loading and validation


def load_sweep(path: str) -> list[dict]:
    """Imports the sweep file and returns ``get_sweep()``'s entries, checked for shape."""
    if not os.path.isfile(path):
        raise SweepError(f"the sweep file {path!r} does not exist; pass e.g. launch/sweeps/simclr_digits_temp_lr.py.")
    spec = importlib.util.spec_from_file_location(f"clrjax_sweep_{sweep_name(path)}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as err:  # the user's file: report its error with the file name
        raise SweepError(f"importing the sweep file {path} failed ({type(err).__name__}: {err}); fix the file.") from err
    if not callable(getattr(module, "get_sweep", None)):
        raise SweepError(f"the sweep file {path} defines no get_sweep(); add `def get_sweep(): return [...]` "
                         "returning a list of override dicts.")
    entries = module.get_sweep()
    if not isinstance(entries, (list, tuple)) or not entries:
        raise SweepError(f"get_sweep() in {path} returned {type(entries).__name__} {entries!r:.80}; "
                         "return a non-empty list of dicts such as [{'optimizer.lr': 1e-3}].")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise SweepError(f"entry {i} of get_sweep() in {path} is {type(entry).__name__} {entry!r:.80}, "
                             "not a dict; return dicts of dotted keys such as {'optimizer.lr': 1e-3}.")
        for key in entry:
            if not isinstance(key, str) or not key:
                raise SweepError(f"entry {i} of get_sweep() in {path} has the key {key!r}; "
                                 "keys must be dotted config fields such as 'optimizer.lr'.")
    return [dict(e) for e in entries]


def check_entries(config, entries: Sequence[dict]) -> None:
    """Applies each entry to the config: unknown keys and wrongly typed values fail here, naming the entry."""
    for i, entry in enumerate(entries):
        try:
            config_lib.apply_overrides(config, entry)
        except (config_lib.ConfigError, TypeError, KeyError, AttributeError) as err:
            raise SweepError(f"sweep entry {i} {entry} does not fit the config: {err}") from None


def extra_overrides(extra_args: Sequence[str]) -> list[str]:
    """The dotted keys that ``--extra`` sets (its ``--config.<key>=...`` flags)."""
    keys = []
    for arg in extra_args:
        if arg.startswith("--config."):
            keys.append(arg[len("--config."):].split("=", 1)[0])
    return keys


def check_extra(config, extra_args: Sequence[str], entries: Sequence[dict]) -> None:
    """Every ``--extra`` config key exists and is not also swept (which value would win is unclear)."""
    swept = {k for e in entries for k in e}
    for key in extra_overrides(extra_args):
        if key in swept:
            raise SweepError(f"--extra sets config.{key}, which the sweep also varies; "
                             "remove it from --extra or from the sweep file.")
        node, parts = config, key.split(".")
        for i, part in enumerate(parts):
            open_dict = ".".join(parts[:i]) in ("loss", "model")  # their keys are checked by the run
            if not open_dict and (not hasattr(node, "keys") or part not in node):
                raise SweepError(f"--extra sets config.{key}, which is not a config field; check the spelling.")
            if open_dict or not hasattr(node, "keys"):
                break
            node = node[part]


# --------------------------------------------------------------------------- naming


def sweep_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def swept_keys(entries: Sequence[dict]) -> list[str]:
    """All keys set by any entry, in order of first appearance."""
    keys = []
    for entry in entries:
        keys += [k for k in entry if k not in keys]
    return keys


def short_keys(keys: Sequence[str]) -> dict:
    """The shortest dotted suffix of each key that no other key shares (optimizer.lr -> lr)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        short[key] = suffix
    return short


def _value_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(_value_text(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def sanitise(text: str) -> str:
    """Keeps names portable across shells and filesystems."""
    return re.sub(r"[^A-Za-z0-9._,=+-]", "_", text)


def run_name(stem: str, entry: dict, short: dict) -> str:
    parts = [stem] + [f"{short.get(k, k)}={_value_text(v)}" for k, v in entry.items()]
    name = sanitise("-".join(parts))
    if len(name) > MAX_NAME_CHARS:  # keep it readable and unique: prefix + hash of the whole
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        name = name[:MAX_NAME_CHARS - 9] + "-" + digest
    return name


# --------------------------------------------------------------------------- commands


def flag_value(value: Any) -> str:
    """A value as ml_collections' --config.<key>= flag parser reads it."""
    if isinstance(value, (list, tuple)):
        return "(" + ",".join(flag_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def plan_runs(sweep_path: str, config_spec: str, root: str, entries: Sequence[dict],
              extra_args: Sequence[str] = (), python: str = sys.executable,
              script: str = TRAIN_SCRIPT) -> list[Run]:
    """One Run per entry, with unique workdirs ROOT/<sweep>-<key>=<value>..."""
    stem = sweep_name(sweep_path)
    short = short_keys(swept_keys(entries))
    runs, seen = [], {}
    for i, entry in enumerate(entries):
        name = run_name(stem, entry, short)
        if name in seen:
            raise SweepError(f"sweep entries {seen[name]} and {i} both give the run {name!r}; "
                             "remove the duplicate entry.")
        seen[name] = i
        workdir = os.path.join(root, name)
        argv = [python, script, f"--config={config_spec}", f"--workdir={workdir}"]
        argv += list(extra_args) + [f"--config.{k}={flag_value(v)}" for k, v in entry.items()]
        runs.append(Run(name, workdir, dict(entry), argv))
    return runs


def prepare(sweep_path: str, config_spec: str, root: str, extra: str = "", **plan_kwargs) -> list[Run]:
    """Loads and validates everything, then plans the runs; raises SweepError before any run starts."""
    entries = load_sweep(sweep_path)
    try:
        config = config_lib.load_config_file(config_spec)
    except (config_lib.ConfigError, ValueError) as err:
        raise SweepError(f"--config={config_spec} could not be loaded: {err}") from None
    check_entries(config, entries)
    extra_args = shlex.split(extra or "")
    check_extra(config, extra_args, entries)
    return plan_runs(sweep_path, config_spec, root, entries, extra_args, **plan_kwargs)


# --------------------------------------------------------------------------- status files


def _write_json(path: str, obj: Any) -> None:
    """Atomic: a reader (collect, a second sweep) never sees half a file."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_manifest(root: str, sweep_path: str, config_spec: str, runs: Sequence[Run]) -> None:
    """Merges these runs into ROOT/sweep.json, so several sweeps may share one ROOT."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, MANIFEST)
    manifest = _read_json(path) or {"runs": {}}
    for run in runs:
        manifest["runs"][run.name] = {"overrides": run.overrides, "sweep": sweep_path, "config": config_spec,
                                      "command": shlex.join(run.argv)}
    _write_json(path, manifest)


def status_of_exit(code: int) -> str:
    if code == 0:
        return "done"
    return "preempted" if code == 75 else "failed"


def last_error_line(log_path: str) -> str:
    """The most telling line of a failed run's log: its last error message, else its last line."""
    try:
        with open(log_path, errors="replace") as f:
            lines = [l.strip() for l in f if l.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if re.search(r"error|Error|stopped:|Traceback", line):
            return line[:300]
    return lines[-1][:300] if lines else ""


# --------------------------------------------------------------------------- running locally


def nvidia_smi_gpus() -> list[str]:
    """Indices of the machine's NVIDIA GPUs from ``nvidia-smi -L`` ("GPU 0: ..."); [] without it."""
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return re.findall(r"^GPU (\d+):", out, flags=re.M)


def visible_gpus(environ=None, list_gpus=nvidia_smi_gpus) -> list[str]:
    """The GPUs runs started here may use: CUDA_VISIBLE_DEVICES when set (it already narrows
    what CUDA, and so JAX, sees), else every GPU nvidia-smi lists."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" in environ:
        return [d.strip() for d in environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    return list_gpus()


def gpu_slots(gpus: Sequence[str], parallel: int, gpus_per_run: Optional[int] = None) -> Optional[list]:
    """Disjoint GPU lists, one per concurrent run; None where nothing changes (no GPU, or one
    run at a time given all of them). JAX preallocates most of each GPU it sees, so two runs
    sharing one run out of memory."""
    if not gpus or (parallel == 1 and gpus_per_run is None):
        return None
    if gpus_per_run is not None and gpus_per_run < 1:
        raise SweepError(f"--gpus_per_run is {gpus_per_run}; pass 1 or more GPUs per run.")
    per_run = gpus_per_run or len(gpus) // parallel
    if per_run < 1 or per_run * parallel > len(gpus):
        raise SweepError(f"--parallel={parallel} runs with {gpus_per_run or 'at least 1'} GPU(s) each need "
                         f"{max(per_run, 1) * parallel} GPUs, but {len(gpus)} are visible ({','.join(gpus)}); "
                         f"pass --parallel={max(1, len(gpus) // max(per_run, 1))} or a smaller --gpus_per_run.")
    return [list(gpus[i * per_run:(i + 1) * per_run]) for i in range(parallel)]


def _start(run: Run, gpus: Optional[Sequence[str]] = None) -> tuple:
    os.makedirs(run.workdir, exist_ok=True)
    log = open(os.path.join(run.workdir, LOG), "a")
    env = None if gpus is None else dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(gpus))
    # Own session: our SIGTERM forwarding reaches each run exactly once.
    proc = subprocess.Popen(run.argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    _write_json(os.path.join(run.workdir, STATUS), {
        "status": "running", "overrides": run.overrides, "command": shlex.join(run.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "pid": proc.pid})
    return proc, log, time.monotonic()


def _finish(run: Run, proc, log, started: float) -> str:
    log.close()
    code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
    status = status_of_exit(code)
    record = {"status": status, "exit_code": code, "meaning": EXIT_MEANING.get(code, "failed"),
              "overrides": run.overrides, "command": shlex.join(run.argv),
              "elapsed_s": round(time.monotonic() - started, 1)}
    if status != "done":
        record["error"] = last_error_line(os.path.join(run.workdir, LOG))
    _write_json(os.path.join(run.workdir, STATUS), record)
    return status


def run_local(runs: Sequence[Run], parallel: int = 1, rerun_done: bool = False,
              slots: Optional[Sequence[Sequence[str]]] = None) -> dict:
    """Runs ``parallel`` at a time; a failure is recorded and the rest go on. Returns {name: status}.

    With ``slots`` (``gpu_slots``) each running run has one slot's GPUs as CUDA_VISIBLE_DEVICES.
    """
    results = {}
    todo = []
    for run in runs:
        previous = _read_json(os.path.join(run.workdir, STATUS)) or {}
        if previous.get("status") == "done" and not rerun_done:
            print(f"[sweep] {run.name}: already done, skipped", flush=True)
            results[run.name] = "done"
        else:
            todo.append(run)
    active = {}  # name -> (run, proc, log, started)
    free_slots = [list(slot) for slot in slots] if slots else None
    slot_of = {}
    stopping = []

    def forward(signum, _frame):
        stopping.append(signum)  # runs save and exit 75 (preempted); nothing new starts
        for _, proc, _, _ in active.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    total, started_count = len(todo), 0
    try:
        while todo or active:
            while todo and len(active) < parallel and not stopping:
                run = todo.pop(0)
                started_count += 1
                gpus = free_slots.pop(0) if free_slots is not None else None
                slot_of[run.name] = gpus
                where = f" on GPUs {','.join(gpus)}" if gpus is not None else ""
                print(f"[sweep] ({started_count}/{total}) start {run.name}{where}", flush=True)
                active[run.name] = (run, *_start(run, gpus))
            for name in list(active):
                run, proc, log, started = active[name]
                if proc.poll() is not None:
                    del active[name]
                    if free_slots is not None:
                        free_slots.append(slot_of.pop(name))
                    results[name] = _finish(run, proc, log, started)
                    print(f"[sweep] {name}: {results[name]} (exit {proc.returncode}, "
                          f"{time.monotonic() - started:.0f} s)", flush=True)
            if stopping and not active:
                break
            time.sleep(0.2)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    for run in todo:
        results.setdefault(run.name, "pending")
    return results


# --------------------------------------------------------------------------- emitting for clusters


SLURM_ARRAY_TEMPLATE = """#!/bin/bash
# Sweep {stem}: one SLURM array task per run, at most {parallel} at a time.
# Submit from the root of the clrjax checkout (the job runs in $SLURM_SUBMIT_DIR):
#   sbatch {path}
# Resume after preemption/time-out: submit it again (finished runs are skipped; the rest resume
# from their checkpoints). Each task requeues itself: 120 s before its time limit SLURM sends
# SIGTERM to the srun task (--signal without B:), sweep.py passes it to the run, which saves
# and exits 75, and the task is requeued. Stop one so that it saves: scancel --signal=TERM JOB_TASK.
# Written by launch/sweep.py --emit=slurm; resources from its --slurm_* options.
#SBATCH --job-name=sweep-{stem}
#SBATCH --array=0-{last}%{parallel}
{resources}#SBATCH --requeue
#SBATCH --signal=TERM@120
#SBATCH --open-mode=append
#SBATCH --output={root}/slurm-%A_%a.out
set -uo pipefail
# The interpreter with clrjax installed: CLRJAX_PYTHON at submit time, else the one that wrote this.
PYTHON="${{CLRJAX_PYTHON:-{python}}}"
if [ ! -f launch/sweep.py ]; then
  echo "error: no launch/sweep.py in $PWD; submit this script from the root of the clrjax checkout." >&2
  exit 2
fi
RUNS=({names})
RUN=${{RUNS[$SLURM_ARRAY_TASK_ID]}}
# sweep.py records ROOT/$RUN/status.json and passes SIGTERM on, so the run saves first.
# srun makes the run a job step: SLURM signals it directly, and with several nodes JAX's SLURM
# detection starts one process per node.
srun --kill-on-bad-exit=0 --wait=120 --ntasks-per-node=1 "$PYTHON" launch/sweep.py run {sweep} --config={config} \\
    --workdir={root} --only="$RUN"{script}{extra} &
child=$!
interrupted=0
# Never signal srun itself (it would SIGKILL the run); ask SLURM to signal the step's tasks.
trap 'interrupted=1; scancel --signal=TERM "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"' TERM
wait "$child"
rc=$?
# A trap that ran during `wait` makes it return 128+15 while the run goes on: wait again for the
# run's own status, so that a saved run's 75 requeues the task.
while [ "$interrupted" = 1 ] && [ "$rc" -gt 128 ]; do
  interrupted=0
  wait "$child"
  status=$?
  [ "$status" -eq 127 ] || rc=$status  # 127: already waited for; keep its status
done
if [ "$rc" -eq 75 ]; then  # stopped by the signal after saving: requeue this array task to resume
  scontrol requeue "${{SLURM_ARRAY_JOB_ID}}_${{SLURM_ARRAY_TASK_ID}}"
fi
exit $rc
"""


@dataclass
class SlurmResources:
    """The #SBATCH resource lines of the array script: each array task is one run."""
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    time: str = "04:00:00"
    partition: str = ""
    account: str = ""

    def check(self) -> None:
        if self.nodes < 1:
            raise SweepError(f"--slurm_nodes is {self.nodes}; pass 1 or more nodes per run.")
        if self.gpus_per_node < 0:
            raise SweepError(f"--slurm_gpus_per_node is {self.gpus_per_node}; pass 0 (CPU) or more.")
        if self.cpus_per_task < 1:
            raise SweepError(f"--slurm_cpus_per_task is {self.cpus_per_task}; pass 1 or more.")
        if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", self.time):
            raise SweepError(f"--slurm_time is {self.time!r}; pass a SLURM time such as 04:00:00, 90 or 1-00:00:00.")
        for name in ("partition", "account"):
            if not re.fullmatch(r"[A-Za-z0-9_.,-]*", getattr(self, name)):
                raise SweepError(f"--slurm_{name} is {getattr(self, name)!r}; pass a plain SLURM name.")

    def lines(self) -> str:
        out = [f"--nodes={self.nodes}", "--ntasks-per-node=1"]
        if self.gpus_per_node:
            out.append(f"--gpus-per-node={self.gpus_per_node}")
        out += [f"--cpus-per-task={self.cpus_per_task}", f"--time={self.time}"]
        out += [f"--{name}={getattr(self, name)}" for name in ("partition", "account") if getattr(self, name)]
        return "".join(f"#SBATCH {line}\n" for line in out)

    def run_flags(self) -> list:
        """With several nodes JAX's SLURM detection binds each process to GPU SLURM_LOCALID only;
        one process per node must drive all of its GPUs (as in launch/slurm.sbatch)."""
        if self.nodes > 1 and self.gpus_per_node > 1:
            return ["--local_device_ids=" + ",".join(str(i) for i in range(self.gpus_per_node))]
        return []


def emit_slurm(runs: Sequence[Run], root: str, sweep_path: str, config_spec: str, extra: str,
               parallel: int, resources: Optional[SlurmResources] = None,
               python: str = sys.executable, script: str = TRAIN_SCRIPT) -> str:
    resources = resources or SlurmResources()
    resources.check()
    if not re.fullmatch(r"[A-Za-z0-9_./+-]+", python):
        raise SweepError(f"--python is {python!r}; pass an interpreter path without spaces or quotes.")
    extra = " ".join(a for a in [extra, shlex.join(resources.run_flags())] if a)
    path = os.path.join(root, "sweep_array.sbatch")
    os.makedirs(root, exist_ok=True)
    text = SLURM_ARRAY_TEMPLATE.format(
        stem=sweep_name(sweep_path), path=path, last=len(runs) - 1, parallel=max(1, parallel),
        resources=resources.lines(), root=shlex.quote(os.path.abspath(root)),
        names=" ".join(shlex.quote(r.name) for r in runs), python=python,
        sweep=shlex.quote(sweep_path), config=shlex.quote(config_spec),
        script="" if script == TRAIN_SCRIPT else f" --script={shlex.quote(script)}",
        extra=f" --extra={shlex.quote(extra)}" if extra else "")
    with open(path, "w") as f:
        f.write(text)
    return path


def emit_tpu(runs: Sequence[Run], root: str) -> str:
    """One launch/tpu_pod.sh line per run; each run uses the whole pod, so they run one after another."""
    path = os.path.join(root, "tpu_commands.sh")
    os.makedirs(root, exist_ok=True)
    lines = ["#!/bin/bash",
             "# Each line runs one sweep run on every worker of the pod (TPU=... ZONE=... must be set).",
             "# Re-running this file resumes unfinished runs from their checkpoints.",
             "# ROOT must be a directory every worker sees (shared filesystem) for checkpoints to work."]
    for run in runs:
        remote = ["python"] + run.argv[1:]
        lines.append(f"launch/tpu_pod.sh run {shlex.join(remote[1:])} || echo 'run {run.name} failed'")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


# --------------------------------------------------------------------------- collecting


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


def last_metrics_row(path: str) -> dict:
    """The last complete JSON line of metrics.jsonl (a torn last line from a kill is skipped)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


def final_metrics(workdir: str) -> dict:
    """eval.json (flattened, e.g. 'pretrained.linear_top1') over the last metrics.jsonl row."""
    results = dict(last_metrics_row(os.path.join(workdir, "metrics.jsonl")))
    evaluation = _read_json(os.path.join(workdir, "eval.json"))
    if evaluation:
        results.update(flatten(evaluation))
    return results


def infer_status(workdir: str, results: dict) -> str:
    """For runs without status.json (e.g. launched by the TPU command list)."""
    if os.path.exists(os.path.join(workdir, "eval.json")):
        return "done"
    config = _read_json(os.path.join(workdir, "config.json")) or {}
    steps = config.get("num_steps") or 0
    if steps and results.get("step", 0) >= steps:
        return "done"
    return "unknown" if results else "pending"


def collect_rows(root: str) -> tuple[list[dict], list[str]]:
    """One row per run (manifest runs first, then any other run directory) and the swept keys."""
    if not os.path.isdir(root):
        raise SweepError(f"the sweep directory {root!r} does not exist; pass the --workdir of `sweep.py run`.")
    manifest = (_read_json(os.path.join(root, MANIFEST)) or {}).get("runs", {})
    names = list(manifest)
    names += sorted(n for n in os.listdir(root) if n not in manifest and
                    any(os.path.exists(os.path.join(root, n, f)) for f in (STATUS, "config.json")))
    if not names:
        raise SweepError(f"{root} holds no sweep runs (no {MANIFEST} and no run directories); "
                         "pass the --workdir of `sweep.py run`.")
    rows = []
    for name in names:
        workdir = os.path.join(root, name)
        status = _read_json(os.path.join(workdir, STATUS)) or {}
        overrides = status.get("overrides", manifest.get(name, {}).get("overrides", {}))
        results = final_metrics(workdir)
        rows.append({"run": name, "status": status.get("status") or infer_status(workdir, results),
                     "exit_code": status.get("exit_code", ""), "error": status.get("error", ""),
                     "overrides": overrides, "results": results})
    return rows, swept_keys([r["overrides"] for r in rows])


def _metric_value(row: dict, metric: str) -> Optional[float]:
    value = row["results"].get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def sort_rows(rows: list[dict], metric: str, mode: str) -> list[dict]:
    """Best first; runs without the metric (failed, unfinished) after all runs with it."""
    def key(row):
        value = _metric_value(row, metric)
        if value is None:
            return (1, 0.0, row["run"])
        return (0, -value if mode == "max" else value, row["run"])
    return sorted(rows, key=key)


def check_metric(rows: Sequence[dict], metric: str) -> None:
    finished = [r for r in rows if r["status"] == "done"]
    if finished and all(_metric_value(r, metric) is None for r in finished):
        available = sorted({k for r in finished for k, v in r["results"].items() if isinstance(v, (int, float))})
        raise SweepError(f"no finished run reports the metric {metric!r}; pass --metric= one of "
                         f"{', '.join(available)}.")


def _cell(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_cell(v) for v in value)
    return str(value)


def table(rows: Sequence[dict], keys: Sequence[str], metric: str) -> tuple[list[str], list[list[str]]]:
    context = [c for c in ("step", "loss") if c != metric]  # where each run ended, beside the metric
    header = ["run", "status"] + list(keys) + [metric] + context + ["exit_code", "error"]
    body = []
    for row in rows:
        value = _metric_value(row, metric)
        status = row["status"]
        if status == "failed" and row["exit_code"] != "":
            status = f"failed (exit {row['exit_code']})"
        body.append([row["run"], status] + [_cell(row["overrides"].get(k)) for k in keys] +
                    ["" if value is None else f"{value:.6g}"] + [_cell(row["results"].get(c)) for c in context] +
                    [_cell(row["exit_code"]), row["error"]])
    return header, body


def write_csv(path: str, header, body) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(body)


def write_markdown(path: str, header, body, metric: str, mode: str, root: str) -> None:
    def esc(text):
        return str(text).replace("|", "\\|")
    lines = [f"# Sweep results: {os.path.abspath(root)}", "",
             f"Sorted by `{metric}` ({mode}); failed runs last.", "",
             "| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in body]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _numeric(values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def plot_results(path: str, rows: Sequence[dict], keys: Sequence[str], metric: str) -> bool:
    """Metric against each swept key (one panel per key); False when nothing finished has the metric."""
    points = [r for r in rows if _metric_value(r, metric) is not None]
    if not points or not keys:
        return False
    import matplotlib  # local: only collect needs it, and only here
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        have = [r for r in points if key in r["overrides"]]
        xs = [r["overrides"][key] for r in have]
        ys = [_metric_value(r, metric) for r in have]
        if _numeric(xs):
            ax.scatter(xs, ys)
            positive = [x for x in xs if x > 0]
            if len(positive) == len(xs) and xs and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")  # learning rates and temperatures span decades
        else:
            labels = sorted({_cell(x) for x in xs})
            ax.scatter([labels.index(_cell(x)) for x in xs], ys)
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def collect(root: str, metric: str = "pretrained.linear_top1", mode: str = "max") -> list[dict]:
    """Writes ROOT/results.{csv,md,png}; returns the rows, best first."""
    if mode not in ("max", "min"):
        raise SweepError(f"--mode is {mode!r}; pass max (higher is better) or min.")
    rows, keys = collect_rows(root)
    check_metric(rows, metric)
    rows = sort_rows(rows, metric, mode)
    header, body = table(rows, keys, metric)
    write_csv(os.path.join(root, "results.csv"), header, body)
    write_markdown(os.path.join(root, "results.md"), header, body, metric, mode, root)
    plot_results(os.path.join(root, "results.png"), rows, keys, metric)
    return rows


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Expand, launch and collect hyper-parameter sweeps.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="expand a sweep file into runs and launch them")
    run.add_argument("sweep", help="sweep file with get_sweep()")
    run.add_argument("--config", required=True, help="config spec, e.g. configs/simclr.py:digits")
    run.add_argument("--workdir", required=True, help="sweep root; each run gets ROOT/<run name>")
    run.add_argument("--parallel", type=int, default=1, help="local runs at a time (slurm: array tasks at a time)")
    run.add_argument("--extra", default="", help="flags added to every run, e.g. '--config.num_epochs=20'")
    run.add_argument("--emit", default="local", choices=("local", "slurm", "tpu"),
                     help="local: run here; slurm: write a job-array script; tpu: write a command list")
    run.add_argument("--dry_run", action="store_true", help="print the run commands, start nothing")
    run.add_argument("--only", default=None, help="run only the run with this name (used by the SLURM array)")
    run.add_argument("--rerun_done", action="store_true", help="also re-run runs whose status is done")
    run.add_argument("--script", default=TRAIN_SCRIPT, help="experiment script (default experiments/train.py)")
    run.add_argument("--gpus_per_run", type=int, default=None,
                     help="local runs on a GPU machine: GPUs each run gets (default: the visible GPUs / --parallel)")
    slurm = run.add_argument_group("--emit=slurm", "resources of each array task (one run each)")
    slurm.add_argument("--python", default=sys.executable,
                       help="interpreter the job runs (default: this one; CLRJAX_PYTHON at submit time wins)")
    defaults = SlurmResources()
    slurm.add_argument("--slurm_nodes", type=int, default=defaults.nodes, help="nodes per run (one process each)")
    slurm.add_argument("--slurm_gpus_per_node", type=int, default=defaults.gpus_per_node, help="0 for CPU runs")
    slurm.add_argument("--slurm_cpus_per_task", type=int, default=defaults.cpus_per_task)
    slurm.add_argument("--slurm_time", default=defaults.time, help="time limit per run, e.g. 04:00:00")
    slurm.add_argument("--slurm_partition", default=defaults.partition)
    slurm.add_argument("--slurm_account", default=defaults.account)
    col = sub.add_parser("collect", help="tabulate and plot the final metrics of a sweep's runs")
    col.add_argument("root", help="the sweep's --workdir")
    col.add_argument("--metric", default="pretrained.linear_top1", help="key of eval.json (dotted) or metrics.jsonl")
    col.add_argument("--mode", default="max", help="max or min: which end of the metric is best")
    return parser.parse_args(argv)


def command_run(args) -> int:
    if args.parallel < 1:
        raise SweepError(f"--parallel is {args.parallel}; pass 1 or more.")
    script = args.script
    if args.emit == "local" and not os.path.isfile(script):
        # The default is relative to the repository; cluster emitters keep it relative on purpose.
        script = os.path.join(ROOT, script)
        if not os.path.isfile(script):
            raise SweepError(f"--script={args.script} does not exist; pass the experiment script's path.")
    runs = prepare(args.sweep, args.config, args.workdir, args.extra, script=script)
    if args.only is not None:
        runs = [r for r in runs if r.name == args.only]
        if not runs:
            raise SweepError(f"--only={args.only} is not a run of {args.sweep}; the sweep file changed since "
                             "the job was written, or the name is misspelt.")
    if args.dry_run:
        for run in runs:
            print(shlex.join(run.argv))
        return 0
    # Checked before anything is written: N local runs must not share GPUs.
    slots = gpu_slots(visible_gpus(), min(args.parallel, len(runs)), args.gpus_per_run) \
        if args.emit == "local" else None
    if args.only is None:  # array tasks share the manifest written when the job was emitted
        write_manifest(args.workdir, args.sweep, args.config, runs)
    if args.emit == "slurm":
        resources = SlurmResources(args.slurm_nodes, args.slurm_gpus_per_node, args.slurm_cpus_per_task,
                                   args.slurm_time, args.slurm_partition, args.slurm_account)
        path = emit_slurm(runs, args.workdir, args.sweep, args.config, args.extra, args.parallel,
                          resources, python=args.python, script=args.script)
        print(f"wrote {path}; submit it with: sbatch {path}")
        return 0
    if args.emit == "tpu":
        path = emit_tpu(runs, args.workdir)
        print(f"wrote {path}; run it with: TPU=<name> ZONE=<zone> bash {path}")
        return 0
    results = run_local(runs, args.parallel, args.rerun_done, slots)
    failed = sorted(n for n, s in results.items() if s != "done")
    print(f"[sweep] {len(results) - len(failed)}/{len(results)} runs done"
          + (f"; not done: {', '.join(failed)}" if failed else "")
          + f". Collect with: python launch/sweep.py collect {args.workdir}", flush=True)
    if args.only is not None:  # a SLURM array task exits with its run's status (75 -> requeue)
        status = _read_json(os.path.join(runs[0].workdir, STATUS)) or {}
        return int(status.get("exit_code", 1))
    return 0 if not failed else 1


def command_collect(args) -> int:
    rows = collect(args.root, args.metric, args.mode)
    done = sum(r["status"] == "done" for r in rows)
    print(open(os.path.join(args.root, "results.md")).read())
    print(f"{done}/{len(rows)} runs done; wrote results.csv, results.md, results.png in {args.root}")
    return 0


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        return command_run(args) if args.command == "run" else command_collect(args)
    except SweepError as err:
        print(f"launch/sweep.py: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
