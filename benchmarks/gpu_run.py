#!/usr/bin/env python3
r"""Every GPU target of BENCHMARKS.md in ONE command of at most 9 minutes on one H200.

COMMANDS
  # here (network, CPU), once before a GPU session: fill benchmarks/carry/ (git-ignored) with what
  # travels: the ml_collections wheel for Python 3.12 and the four Fashion-MNIST .gz files
  python benchmarks/gpu_run.py --prepare
  # here, on CPU (tests/test_gpu_driver.py runs it): resolve, validate and trace every config at
  # full size, run every part for one tiny step, read each JSON back, audit the imports
  python benchmarks/gpu_run.py --check [--out DIR]
  # on the GPU machine (device tool `run`: carry ["benchmarks/carry"], timeout_s 600); it
  # installs the carried wheel offline and says so:
  python3 benchmarks/gpu_run.py --out $OUT
  # the summary of a results directory
  python benchmarks/gpu_run.py --summarize DIR

The parts, in order of value (each writes its JSON as soon as it ends, and summary.json is
rewritten after each, so a command cut short keeps what it measured):
  1. resnet50, torch_resnet50: clrjax ResNet-50 SimCLR 224 bf16 B=256 train step + input
     pipeline (experiments/benchmark.py), and the PyTorch reference of the same step
     (benchmarks/torch_reference.py: torch.compile, channels_last, bf16);
  2. vit_b16: ViT-B/16 SimCLR 224 bf16 B=256 step, MFU;
  3. accuracy: SimCLR ResNet-18 (CIFAR stem) on Fashion-MNIST through experiments/train.py for
     as many epochs as fit in the part's time (measured on a short first invocation), then the
     program's own final linear probe + kNN of the trained and the random-init encoder;
  4. losses: forward+backward of the four losses at N in {4096, 16384}, d in {128, 2048, 8192}.
Each part has a time budget (``Step.max_s``), shrunk so that every later part keeps its
minimum (``Step.min_s``) within the whole command's budget (``--budget_s``, 540 s); a part
past its budget is stopped (SIGTERM to its process group, then SIGKILL). The summary prints
the three ratios against their targets and the accuracy. JAX's persistent compilation
cache lives in /tmp/clrjax_gpu/jax_cache (recent JAX keeps XLA's GPU autotuning results
there too), so a program compiled twice within the command, or by a second command on a
still-warm machine, is read back instead of compiled.

Files written to --out (at most 8 come back from a device run): clrjax_resnet50_sgd.json,
torch_resnet50.json, clrjax_vitb16.json, accuracy_fashion_mnist.json, clrjax_losses.json,
summary.json and driver.log (every child's output). This driver imports nothing outside the
standard library outside --check, so it never takes GPU memory itself.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARRY = os.path.join(ROOT, "benchmarks", "carry")            # git-ignored (benchmarks/.gitignore)
WHEELS_DIR = os.path.join(CARRY, "wheels")
FASHION_DIR = os.path.join(CARRY, "fashion-mnist")
SYSTEM_FASHION_DIR = "/usr/share/datasets/fashion-mnist"    # Debian package dataset-fashion-mnist
WORK = "/tmp/clrjax_gpu"                                      # scratch outside --out: workdir, caches
SITE_DIR = os.path.join(WORK, "site")                         # where the carried wheels are installed
IMPORT_AUDIT = os.path.join(ROOT, "benchmarks", "import_audit.py")

COMMAND_BUDGET_S = 540.0      # the issue: the whole command in at most 9 minutes
SETUP_RESERVE_S = 40.0        # wheel install, environment probe, nvidia-smi
MAX_FILES_BACK = 8            # device tool: at most 8 files come back from $OUT
CARRY_LIMIT_BYTES = 64 * 2**20  # device tool: working tree + carried paths
EXIT_PREEMPTED = 75           # experiments/train.py: stopped by SIGTERM after saving (clrjax/cli.py)
TARGETS = {"resnet50_vs_torch": 1.3, "vit_b16_mfu": 0.40, "input_vs_step": 1.5}

# Fashion-MNIST as the Debian package (and the original release) ships it: name -> bytes.
FASHION_FILES = {"train-images-idx3-ubyte.gz": 26421856, "train-labels-idx1-ubyte.gz": 29491,
                 "t10k-images-idx3-ubyte.gz": 4422079, "t10k-labels-idx1-ubyte.gz": 5125}
# Pure-Python packages clrjax needs that the GPU image lacks: distribution -> pinned requirement.
CARRIED_WHEELS = {"ml-collections": "ml_collections==1.1.0"}
# Installed here, absent on the GPU machine: --check runs every tiny part with these made absent.
ABSENT_ON_GPU = ("grain", "tensorflow_datasets", "tensorflow", "array_record")

# The GPU machine's Python packages: /work/.library/device/KINDS.md, "Python packages already
# there", nvidia-h200 image 'cuda' as read on 2026-11-17 (Python 3.12.3, jax 0.11.2, torch 2.11.0).
GPU_PACKAGES_TEXT = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils
execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet
httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax
jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning
lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib
mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc
nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver
nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx
optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools
shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""


def normalise(dist: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", dist).lower()


GPU_PACKAGES = frozenset(normalise(n) for n in GPU_PACKAGES_TEXT.split())

# XLA's CPU backend with cheap codegen: --check checks the harness, not the speed.
CHECK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CHECK_STEP_TIMEOUT_S = 240.0


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass
class Step:
    """One command of the GPU run (``kind='accuracy'``: the train/evaluate sequence of part 3)."""
    name: str
    part: int
    title: str
    program: str                 # relative to the repository root
    args: List[str]
    json_name: str
    max_s: float                 # its budget when time allows
    min_s: float                 # what it needs to be worth starting; later parts keep theirs
    tiny: List[str]              # appended in --check: tiny shapes and steps on CPU
    kind: str = "command"
    tiny_config: str = ""        # --check: this --config= instead (a smaller encoder of the same kind)

    def argv(self, check: bool) -> List[str]:
        if not check:
            return [self.program, *self.args]
        args = [f"--config={self.tiny_config}" if self.tiny_config and a.startswith("--config=") else a
                for a in self.args]
        return [self.program, *args, *self.tiny]


ACCURACY_CONFIG = "configs/simclr.py:fashion_mnist,encoder=resnet18"
ACCURACY_CALIBRATION_STEPS = 150   # under the preset's 1-epoch warmup (234 steps): the schedule
#                                    of these steps does not depend on the epoch count chosen after
ACCURACY_EVAL_RESERVE_S = 70.0     # final linear probe + kNN, trained and random-init encoders
ACCURACY_RESTART_RESERVE_S = 20.0  # a run stopped by SIGTERM is evaluated by a fresh process


def build_plan(out: str, data_dir: str, appends: Sequence[str] = ()) -> List[Step]:
    """The GPU run, in order of value. ``appends``: ``NAME=ARG`` extra arguments for a step."""
    j = lambda name: f"--json_out={os.path.join(out, name)}"  # noqa: E731
    # --check only: bf16 on XLA's CPU backend compiles about twice as slowly as float32 (the
    # full-size bf16 configs are still lowered, in check_configs)
    tiny_resnet = ["--config.model.dtype=float32", "--config.batch_size=8", "--config.model.width_multiplier=0.125",
                   "--config.augment.crop_size=64", "--config.dataset.image_size=72",
                   "--config.projector.hidden_dims=(32,)", "--steps=1", "--warmup=0"]
    steps = [
        Step("resnet50", 1, "clrjax ResNet-50 SimCLR 224 bf16 B=256: step + input pipeline (SGD, as the reference)",
             "experiments/benchmark.py",
             ["--config=configs/simclr.py:imagenet", "--config.batch_size=256", "--config.model.dtype=bfloat16",
              "--config.optimizer.name=sgd", "--mode=step,input", "--steps=20", "--warmup=5",
              j("clrjax_resnet50_sgd.json")],
             "clrjax_resnet50_sgd.json", max_s=150, min_s=60, tiny=tiny_resnet,
             tiny_config="configs/simclr.py:imagenet,encoder=resnet18"),
        Step("torch_resnet50", 1, "PyTorch reference ResNet-50 SimCLR 224 bf16 B=256 (torch.compile, channels_last)",
             "benchmarks/torch_reference.py",
             ["--arch=resnet50", "--image_size=224", "--batch_size=256", "--steps=20", "--warmup=5",
              j("torch_resnet50.json")],
             "torch_resnet50.json", max_s=180, min_s=60,
             tiny=["--arch=tiny", "--image_size=32", "--batch_size=8", "--steps=1", "--warmup=0",
                   "--no_compile", "--device=cpu"]),
        Step("vit_b16", 2, "clrjax ViT-B/16 SimCLR 224 bf16 B=256: step, MFU",
             "experiments/benchmark.py",
             ["--config=configs/simclr.py:imagenet,encoder=vit_base", "--config.batch_size=256",
              "--config.model.dtype=bfloat16", "--mode=step", "--steps=20", "--warmup=5", j("clrjax_vitb16.json")],
             "clrjax_vitb16.json", max_s=110, min_s=50,
             tiny=["--config.model.dtype=float32", "--config.batch_size=8", "--config.augment.crop_size=16",
                   "--config.dataset.image_size=20", "--config.projector.hidden_dims=(32,)", "--steps=1",
                   "--warmup=0"],
             tiny_config="configs/simclr.py:imagenet,encoder=vit_tiny"),
        Step("accuracy", 3, "SimCLR ResNet-18 (CIFAR stem) on Fashion-MNIST: train, then linear probe + kNN "
             "against the random-init encoder", "experiments/train.py",
             [f"--config={ACCURACY_CONFIG}", f"--config.dataset.data_dir={data_dir}",
              "--config.log_every_steps=50", "--config.checkpoint.every_steps=1000000",
              "--config.checkpoint.keep=1"],
             "accuracy_fashion_mnist.json", max_s=270, min_s=150, kind="accuracy",
             tiny=["--config.dataset.name=synthetic", "--config.dataset.image_size=28",
                   "--config.dataset.channels=1", "--config.dataset.num_examples=128", "--config.batch_size=16",
                   "--config.model.widths=(8,8,8,8)", "--config.projector.hidden_dims=(32,)",
                   "--config.eval.batch_size=64", "--config.log_every_steps=1"],
             tiny_config="configs/simclr.py:fashion_mnist"),
        Step("losses", 4, "losses forward+backward at large N and d (float32 embeddings)",
             "experiments/benchmark.py",
             ["--config=configs/simclr.py:imagenet", "--mode=loss", "--loss_methods=simclr,barlow_twins,vicreg,tico",
              "--loss_batch=4096,16384", "--loss_dims=128,2048,8192", "--steps=5", "--warmup=1",
              j("clrjax_losses.json")],
             "clrjax_losses.json", max_s=90, min_s=30,
             tiny=["--loss_batch=64", "--loss_dims=16", "--steps=1", "--warmup=0"]),
    ]
    by_name = {s.name: s for s in steps}
    for item in appends:
        name, sep, arg = item.partition("=")
        if not sep or name not in by_name:
            raise SystemExit(f"--append {item!r}: use NAME=ARG with NAME one of {', '.join(by_name)}")
        by_name[name].args.append(arg)
    return steps


def output_files(steps: Sequence[Step]) -> List[str]:
    return [s.json_name for s in steps] + ["summary.json", "driver.log"]


# --------------------------------------------------------------------------- small helpers


def write_json(path: str, obj) -> None:
    """Atomic: a reader (or a command cut short) never sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def load_json(path: str):
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as err:
        return {"_unreadable": f"{type(err).__name__}: {err}"}


def read_metrics(workdir: str) -> List[dict]:
    """Rows of ``workdir/metrics.jsonl`` (experiments/train.py), a torn last line skipped."""
    rows = []
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    pass
    return rows


def fashion_data_dir() -> Optional[str]:
    """The carried Fashion-MNIST files, else the Debian package's, else None."""
    for d in (FASHION_DIR, SYSTEM_FASHION_DIR):
        if all(os.path.exists(os.path.join(d, f)) for f in FASHION_FILES):
            return d
    return None


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def travelling_tree_bytes() -> Optional[int]:
    """Tracked + untracked-not-ignored files: what travels to the device machine besides ``carry``."""
    try:
        names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(os.path.getsize(os.path.join(ROOT, n)) for n in names if n and os.path.isfile(os.path.join(ROOT, n)))


class Log:
    """Prints and appends to ``driver.log``."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "a", buffering=1)
        self._lock = threading.Lock()

    def write_bytes(self, data: bytes) -> None:
        with self._lock:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
            self._f.write(data.decode("utf-8", "replace"))

    def __call__(self, message: str) -> None:
        self.write_bytes((message + "\n").encode())


# --------------------------------------------------------------------------- running commands


class Runner:
    """Runs child programs with a timeout, their output into the log, optionally import-audited."""

    def __init__(self, env: dict, log: Log, audit_dir: Optional[str] = None):
        self.env = env
        self.log = log
        self.audit_dir = audit_dir
        self.audits: List[str] = []

    def run(self, name: str, argv: Sequence[str], timeout_s: float,
            soft_stop: Optional[Callable[[], bool]] = None) -> dict:
        """Runs ``python argv...`` in the repository root for at most ``timeout_s``.

        ``soft_stop`` is polled; once it returns True the child gets one SIGTERM (the train
        program then saves and exits 75). At ``timeout_s`` the whole process group gets
        SIGTERM, then SIGKILL 10 s later.
        """
        cmd = [sys.executable, *argv]
        if self.audit_dir is not None:
            report = os.path.join(self.audit_dir, f"audit_{name}.json")
            self.audits.append(report)
            cmd = [sys.executable, IMPORT_AUDIT, report, ",".join(ABSENT_ON_GPU), *argv]
        timeout_s = max(1.0, timeout_s)
        self.log(f"=== {name} (budget {timeout_s:.0f} s): python {shlex.join(argv)}")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        tail = collections.deque(maxlen=64)

        def pump():
            fd = proc.stdout.fileno()
            while True:
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                tail.append(chunk)
                self.log.write_bytes(chunk)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = soft_stopped = False
        while proc.poll() is None:
            if time.monotonic() - t0 >= timeout_s:
                timed_out = True
                self._kill_group(proc)
                break
            if soft_stop is not None and not soft_stopped and soft_stop():
                soft_stopped = True
                self.log(f"=== {name}: time is up: SIGTERM (a training loop saves and stops; "
                         "the final evaluation, if already running, goes on)")
                proc.send_signal(signal.SIGTERM)
            time.sleep(0.2)
        proc.wait()
        reader.join(timeout=10)
        wall = time.monotonic() - t0
        note = " (stopped at its budget)" if timed_out else ""
        self.log(f"=== {name}: exit status {proc.returncode}{note} after {wall:.1f} s")
        return {"name": name, "argv": ["python", *argv], "rc": proc.returncode, "wall_s": round(wall, 2),
                "timed_out": timed_out, "soft_stopped": soft_stopped,
                "tail": b"".join(tail).decode("utf-8", "replace")[-6000:]}

    def _kill_group(self, proc) -> None:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def short(result: dict) -> dict:
    """A run record without its output tail (that is in driver.log)."""
    return {k: v for k, v in result.items() if k != "tail"}


# --------------------------------------------------------------------------- part 3: accuracy


EVALUATE_ARGS = ["--config.num_steps=1", "--config.optimizer.warmup_epochs=0", "--allow_config_change"]
"""What makes a stopped run 'finished', so that experiments/train.py evaluates its newest
checkpoint: any ``num_steps`` up to that checkpoint's step does, and 1 always does. The warmup
goes to 0 because it may not exceed ``num_steps``; the evaluation does not use the schedule."""


def run_accuracy(step: Step, runner: Runner, out: str, budget_s: float, *, check: bool,
                 environment: Optional[dict] = None) -> dict:
    """Train SimCLR ResNet-18 on Fashion-MNIST for as many epochs as the budget allows, then evaluate.

    Only experiments/train.py's command line is used:
      1. a first invocation, ``--stop_after_steps`` (within the 1-epoch warmup), measures the
         step's throughput and the start-up (process, compilation) in this very setting;
      2. the same command with ``--config.num_epochs=E --allow_config_change`` resumes it, E
         chosen to end, final evaluation included, inside the budget; the program then runs its
         final linear probe + kNN on the trained and the random-init encoder (eval.json);
      3. if time runs out first (in 1 or 2), the program gets SIGTERM, saves and exits 75, and is
         re-run with EVALUATE_ARGS: a finished run, whose newest checkpoint it evaluates.
         --check always takes this path (it stops the run on purpose).
    """
    t0 = time.monotonic()
    deadline = t0 + budget_s
    left = lambda: deadline - time.monotonic()  # noqa: E731
    workdir = os.path.join(runner.env["CLRJAX_GPU_WORK"], "fashion_mnist_resnet18")
    shutil.rmtree(workdir, ignore_errors=True)
    base = [*step.argv(check), f"--workdir={workdir}"]
    calib_steps = 2 if check else ACCURACY_CALIBRATION_STEPS
    eval_reserve = 0.0 if check else ACCURACY_EVAL_RESERVE_S
    rec: dict = {"what": step.title, "config": ACCURACY_CONFIG, "workdir": workdir, "budget_s": round(budget_s, 1),
                 "environment": environment, "runs": [], "complete": False, "stopped_early": False}
    path = os.path.join(out, step.json_name)
    eval_path = os.path.join(workdir, "eval.json")

    def finish(error: Optional[str] = None) -> dict:
        rows = read_metrics(workdir)
        rec["metrics"] = [{k: r[k] for k in ("step", "epoch", "loss", "probe_acc", "images_per_sec", "elapsed_s")
                           if k in r} for r in rows]
        rec["train_elapsed_s"] = max((r.get("elapsed_s", 0.0) for r in rows), default=None)
        cfg = load_json(os.path.join(workdir, "config.json")) or {}   # the resolved config of the run
        if cfg:
            rec["run"] = {"dataset": cfg["dataset"]["name"], "model": cfg["model"], "batch_size": cfg["batch_size"],
                          "method": cfg["method"], "optimizer": cfg["optimizer"]["name"]}
        if error:
            rec["error"] = error
        rec["part_wall_s"] = round(time.monotonic() - t0, 1)
        write_json(path, rec)
        return rec

    def failed(what: str, run: dict) -> dict:
        return finish(f"the {what} run failed (exit {run['rc']}): {run['tail'][-1500:]}")

    calib = runner.run(f"{step.name}_calibrate", base + ["--config.num_epochs=1000", f"--stop_after_steps={calib_steps}"],
                       left() - eval_reserve)
    rec["runs"].append(short(calib))
    stopped = calib["rc"] == EXIT_PREEMPTED     # cut at its budget, after saving
    if not stopped:
        rows = read_metrics(workdir)
        config_json = load_json(os.path.join(workdir, "config.json")) or {}
        if calib["rc"] != 0 or not rows or "images_per_sec" not in rows[-1] or "batch_size" not in config_json:
            return failed("calibration", calib)
        last, batch = rows[-1], int(config_json["batch_size"])
        ips = float(last["images_per_sec"])
        steps_per_epoch = max(1, round(last["step"] / last["epoch"]))
        startup_s = max(0.0, calib["wall_s"] - calib_steps * batch / ips)
        rec["calibration"] = {"steps": calib_steps, "images_per_s": ips, "batch_size": batch,
                              "steps_per_epoch": steps_per_epoch, "wall_s": calib["wall_s"],
                              "startup_s": round(startup_s, 1)}
        if check:
            epochs = 1000      # never finishes: the driver stops it, which exercises the fallback path
            soft = lambda: any(r.get("step", 0) > calib_steps for r in read_metrics(workdir))  # noqa: E731
        else:
            train_s = left() - eval_reserve - startup_s - 5.0
            epochs = max(1, int(train_s * ips / (steps_per_epoch * batch)))
            soft_at = deadline - eval_reserve - ACCURACY_RESTART_RESERVE_S
            soft = lambda: time.monotonic() >= soft_at  # noqa: E731
        rec["planned_epochs"] = epochs
        write_json(path, rec)
        main = runner.run(f"{step.name}_train", base + [f"--config.num_epochs={epochs}", "--allow_config_change"],
                          left(), soft_stop=soft)
        rec["runs"].append(short(main))
        if not os.path.exists(eval_path):
            if main["rc"] != EXIT_PREEMPTED:
                return failed("training", main)
            stopped = True
    if stopped:
        rec["stopped_early"] = True
        ev = runner.run(f"{step.name}_evaluate", base + EVALUATE_ARGS, left())
        rec["runs"].append(short(ev))
        if not os.path.exists(eval_path):
            return failed("evaluation", ev)
    report = load_json(eval_path)
    rec["eval"] = report
    trained = int(report.get("steps", 0))
    rec["trained_steps"] = trained
    spe = (rec.get("calibration") or {}).get("steps_per_epoch")
    if not spe:  # the calibration was cut short: the log's own epoch counter
        logged = [r for r in read_metrics(workdir) if r.get("epoch")]
        spe = round(logged[-1]["step"] / logged[-1]["epoch"]) if logged else None
    rec["epochs_trained"] = round(trained / spe, 2) if spe else None
    rec["complete"] = True
    return finish()


# --------------------------------------------------------------------------- summary


def summarize(out: str, log: Callable[[str], None] = print) -> dict:
    """Reads every part's JSON in ``out``; prints the targets and the accuracy; returns the figures."""
    s: dict = {"figures": {}, "targets": [], "read": [], "missing": [], "incomplete": []}

    def load(name):
        obj = load_json(os.path.join(out, name))
        if obj is None:
            s["missing"].append(name)
        elif "_unreadable" in obj:
            s["missing"].append(f"{name} ({obj['_unreadable']})")
            obj = None
        else:
            s["read"].append(name)
            if obj.get("complete") is False:
                s["incomplete"].append(name)
        return obj

    def target(name, value, goal, text):
        met = None if value is None else bool(value >= goal)
        s["targets"].append({"name": name, "value": value, "target": goal, "met": met})
        goal_text = f"{100 * goal:.0f}%" if name == "vit_b16_mfu" else f"{goal:g}x"
        log(f"{text} (target >= {goal_text}: {'n/a' if met is None else ('MET' if met else 'MISSED')})")

    def label(obj, row, default):
        """'resnet50 SimCLR 224 bfloat16 B=256' from the JSON's own config (the check's are tiny)."""
        cfg = (obj or {}).get("config") or {}
        try:
            return (f"{cfg['model']['name']} {cfg['method']} {cfg['augment']['crop_size']} "
                    f"{cfg['model']['dtype']} B={row['batch_size']}")
        except (KeyError, TypeError):
            return default

    f = s["figures"]
    log("---- summary " + "-" * 60)
    jx, th = load("clrjax_resnet50_sgd.json"), load("torch_resnet50.json")
    jx_step = (jx or {}).get("step") or []
    if jx_step:
        f["resnet50_images_per_s"] = jx_step[0]["images_per_s"]
        f["resnet50_mfu"] = jx_step[0].get("mfu")
    if th and "images_per_s" in th:
        f["torch_resnet50_images_per_s"] = th["images_per_s"]
    if "resnet50_images_per_s" in f and "torch_resnet50_images_per_s" in f:
        torch_label = (f" ({th['arch']}, torch.compile {'on' if th.get('compile') else 'off'})"
                       if "arch" in th else "")
        ratio = f["resnet50_images_per_s"] / f["torch_resnet50_images_per_s"]
        f["resnet50_vs_torch"] = ratio
        target("resnet50_vs_torch", ratio, TARGETS["resnet50_vs_torch"],
               f"ResNet-50 ({label(jx, jx_step[0], 'resnet50 SimCLR 224 bf16 B=256')}): clrjax "
               f"{f['resnet50_images_per_s']:,.0f} img/s, PyTorch{torch_label} "
               f"{f['torch_resnet50_images_per_s']:,.0f} img/s: {ratio:.2f}x")
    else:
        target("resnet50_vs_torch", None, TARGETS["resnet50_vs_torch"], "ResNet-50 clrjax vs PyTorch: not measured")
    inp = (jx or {}).get("input") or {}
    ratio = (jx or {}).get("input_to_step_ratio", inp.get("input_to_step_ratio"))
    if ratio is not None:
        f["input_vs_step"] = ratio
        f["host_vs_step"] = inp.get("host_to_step_ratio")
        target("input_vs_step", ratio, TARGETS["input_vs_step"],
               f"input pipeline (host + on-device augmentation) {inp.get('host_plus_augment_images_per_s', 0):,.0f} "
               f"img/s: {ratio:.2f}x the step (host loader alone {inp.get('host_to_step_ratio') or 0:.2f}x)")
    else:
        target("input_vs_step", None, TARGETS["input_vs_step"], "input/step: not measured")
    vit = load("clrjax_vitb16.json")
    vit_step = (vit or {}).get("step") or []
    if vit_step:
        row = vit_step[0]
        f["vit_b16_images_per_s"], f["vit_b16_mfu"] = row["images_per_s"], row.get("mfu")
        mfu = row.get("mfu")
        target("vit_b16_mfu", mfu, TARGETS["vit_b16_mfu"],
               f"ViT-B/16 ({label(vit, row, 'vit_base SimCLR 224 bf16 B=256')}): MFU "
               f"{'n/a (no peak for this device)' if mfu is None else f'{100 * mfu:.1f}%'}, "
               f"{row['images_per_s']:,.0f} img/s, {row['flops_per_step'] / 1e12:.2f} TFLOP/step")
    else:
        target("vit_b16_mfu", None, TARGETS["vit_b16_mfu"], "ViT-B/16 MFU: not measured")
    acc = load("accuracy_fashion_mnist.json")
    if acc and acc.get("eval"):
        ev = acc["eval"]
        pre, rnd = ev.get("pretrained", {}), ev.get("random_init", {})
        f["accuracy"] = {"linear_top1": pre.get("linear_top1"), "random_init_linear_top1": rnd.get("linear_top1"),
                         "knn200_top1": pre.get("knn200_top1"), "random_init_knn200_top1": rnd.get("knn200_top1"),
                         "knn20_top1": pre.get("knn20_top1"), "epochs": acc.get("epochs_trained"),
                         "steps": acc.get("trained_steps"), "train_s": acc.get("train_elapsed_s")}
        a = f["accuracy"]
        fmt = lambda x: "n/a" if x is None else f"{x:.4f}"  # noqa: E731
        run = acc.get("run") or {}
        model = run.get("model") or {}
        what = (f"{run['dataset']} {run['method']} {model.get('name')}{' (CIFAR stem)' if model.get('cifar_stem') else ''}"
                f" B={run['batch_size']}" if run else "Fashion-MNIST SimCLR ResNet-18 (CIFAR stem)")
        log(f"Fashion-MNIST accuracy ({what}), {a['epochs']} epochs ({a['steps']} steps, "
            f"{a['train_s'] or 0:.0f} s of training{', stopped by the time budget' if acc.get('stopped_early') else ''}): "
            f"linear top-1 {fmt(a['linear_top1'])} (random init {fmt(a['random_init_linear_top1'])}), "
            f"kNN k=200 top-1 {fmt(a['knn200_top1'])} (random init {fmt(a['random_init_knn200_top1'])})")
    else:
        log(f"Fashion-MNIST accuracy: not measured{': ' + acc['error'][:300] if acc and acc.get('error') else ''}")
    losses = load("clrjax_losses.json")
    rows = (losses or {}).get("loss") or []
    if rows:
        f["loss_rows"] = len(rows)
        f["loss_rows_failed"] = sum("error" in r for r in rows)
        log(f"losses: {len(rows)} rows ({f['loss_rows_failed']} failed); fwd+bwd median ms:")
        for r in rows:
            label = r["method"] + (f"/{r['loss.impl']}" if "loss.impl" in r else "")
            if "error" in r:
                log(f"  {label:<24} N {r['N']:>6} d {r['d']:>5}: failed: {r['error'][:120]}")
            else:
                log(f"  {label:<24} N {r['N']:>6} d {r['d']:>5}: {r['median_s'] * 1e3:9.2f} ms, "
                    f"temp {r['temp_bytes_per_device'] / 2**20:,.0f} MiB")
    else:
        log("losses: not measured")
    if s["missing"]:
        log(f"missing: {', '.join(s['missing'])}")
    if s["incomplete"]:
        log(f"cut short (partial): {', '.join(s['incomplete'])}")
    return s


# --------------------------------------------------------------------------- the GPU run


PROBE = r"""
import importlib, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable}
for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "ml_collections", "absl", "sklearn",
            "tensorboard", "matplotlib", "safetensors", "numpy", "torch", "torchvision", "clrjax"):
    try:
        out[mod] = getattr(importlib.import_module(mod), "__version__", "present")
    except Exception as err:
        out[mod] = f"MISSING ({type(err).__name__}: {err})"
import jax
devices = jax.devices()
out.update(backend=jax.default_backend(), device_count=len(devices), device_kind=devices[0].device_kind,
           devices=[str(d) for d in devices])
try:
    import torch
    out["torch_cuda"] = torch.cuda.is_available()
    out["torch_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
except Exception as err:
    out["torch_cuda"] = f"{type(err).__name__}: {err}"
print("PROBE " + json.dumps(out))
"""


LATENCY_HIDING_FLAG = "--xla_gpu_enable_latency_hiding_scheduler=true"


def probe_environment(env: dict) -> dict:
    """Versions, devices and backend as the parts will see them (a child process: no GPU memory here)."""
    probe_env = dict(env, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=probe_env, capture_output=True, text=True,
                              timeout=180)
    except subprocess.TimeoutExpired:
        return {"probe_error": "the environment probe took over 180 s"}
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")), None)
    return json.loads(line[len("PROBE "):]) if line else {"probe_error": (proc.stdout + proc.stderr)[-3000:]}


def child_env(check: bool, work: str, site: Optional[str]) -> dict:
    env = dict(os.environ)
    paths = ([site] if site else []) + [ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env["CLRJAX_GPU_WORK"] = work
    env["JAX_COMPILATION_CACHE_DIR"] = os.path.join(work, "jax_cache")
    if check:
        env["JAX_PLATFORMS"] = "cpu"
        env["XLA_FLAGS"] = CHECK_XLA_FLAGS          # one CPU device, like the one GPU
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    else:
        # docs/PERFORMANCE.md: the latency-hiding scheduler (harmless on one GPU) and a 0.9
        # memory fraction (newer JAX reads XLA_CLIENT_MEM_FRACTION, older the PYTHON_ name).
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + LATENCY_HIDING_FLAG).strip()
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
        env.setdefault("XLA_CLIENT_MEM_FRACTION", env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    return env


def install_wheels(log: Log) -> Optional[str]:
    """Installs the carried wheels whose module is not importable yet; returns the site dir or None."""
    import importlib.util
    wheels = sorted(glob.glob(os.path.join(WHEELS_DIR, "*.whl")))
    needed = []
    for wheel in wheels:
        module = os.path.basename(wheel).split("-")[0]      # ml_collections-1.1.0-py3-none-any.whl
        if importlib.util.find_spec(module) is not None:
            log(f"setup: {module} is already importable here: not installing {os.path.basename(wheel)}")
        else:
            needed.append(wheel)
    if not wheels:
        log(f"setup: no wheels in {WHEELS_DIR} (run --prepare before the session); nothing installed")
    if not needed:
        return None
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", SITE_DIR, *needed]
    log(f"setup: installing {', '.join(os.path.basename(w) for w in needed)} into {SITE_DIR}: {shlex.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        log(f"setup: pip failed ({proc.returncode}): {proc.stderr[-2000:]}")
        return None
    log(f"setup: installed ({dir_bytes(SITE_DIR) / 2**20:.1f} MiB)")
    return SITE_DIR


def budget_for(selected: Sequence[Step], i: int, time_left: float) -> float:
    """Step ``i``'s budget: its ``max_s``, less whatever the later steps' minimums need."""
    return min(selected[i].max_s, time_left - sum(s.min_s for s in selected[i + 1:]))


def gpu_run(args) -> int:
    t_start = time.monotonic()
    deadline = t_start + args.budget_s
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    log = Log(os.path.join(out, "driver.log"))
    log(f"clrjax GPU run: budget {args.budget_s:.0f} s, results in {out}, scratch in {WORK}")
    site = install_wheels(log)
    env = child_env(False, WORK, site)
    data_dir = fashion_data_dir()
    steps = build_plan(out, data_dir or FASHION_DIR, args.append)
    selected = [s for s in steps if not args.parts or s.name in args.parts]
    if data_dir is None and any(s.kind == "accuracy" for s in selected):
        log(f"setup: no Fashion-MNIST files in {FASHION_DIR} or {SYSTEM_FASHION_DIR}: the accuracy part is skipped "
            "(run --prepare here and carry benchmarks/carry)")
        selected = [s for s in selected if s.kind != "accuracy"]
    log(f"setup: Fashion-MNIST from {data_dir}")

    environment = probe_environment(env)
    if "backend" not in environment and LATENCY_HIDING_FLAG in env["XLA_FLAGS"]:
        # An XLA that no longer knows a flag aborts at start-up: go on without the one we add.
        log(f"setup: JAX failed to start with XLA_FLAGS={env['XLA_FLAGS']!r}: "
            f"{environment.get('probe_error', '')[-800:]}\nsetup: retrying without {LATENCY_HIDING_FLAG}")
        env["XLA_FLAGS"] = env["XLA_FLAGS"].replace(LATENCY_HIDING_FLAG, "").strip()
        environment = probe_environment(env)
    log("setup: environment " + json.dumps(environment))
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        environment["nvidia_smi"] = smi.stdout.strip()
        log(f"setup: nvidia-smi: {environment['nvidia_smi']}")
    environment["xla_flags"] = env["XLA_FLAGS"]
    environment["command"] = shlex.join(["python3", *sys.argv])
    summary_path = os.path.join(out, "summary.json")
    parts: List[dict] = []

    def save_summary(final: bool = False) -> dict:
        figures = summarize(out, log if final else (lambda _m: None))
        write_json(summary_path, {"environment": environment, "parts": parts, "budget_s": args.budget_s,
                                  "elapsed_s": round(time.monotonic() - t_start, 1), **figures})
        return figures

    save_summary()
    if environment.get("backend") != "gpu" and not args.allow_no_gpu:
        log("JAX sees no GPU (backend %r): stopping before the parts. The environment is in summary.json."
            % environment.get("backend"))
        return 2

    for i, step in enumerate(selected):
        budget = budget_for(selected, i, deadline - time.monotonic())
        if budget < step.min_s:
            log(f"=== {step.name}: skipped, {budget:.0f} s left for it (needs {step.min_s:.0f} s)")
            parts.append({"name": step.name, "skipped": True, "budget_s": round(budget, 1)})
            save_summary()
            continue
        log(f"=== part {step.part} {step.name}: {step.title}")
        if step.kind == "accuracy":
            rec = run_accuracy(step, Runner(env, log), out, budget, check=False, environment=environment)
            result = {"name": step.name, "rc": 0 if rec.get("complete") else 1, "budget_s": round(budget, 1),
                      "wall_s": rec.get("part_wall_s"), "runs": rec["runs"], "error": rec.get("error", "")[:500]}
        else:
            result = short(Runner(env, log).run(step.name, step.argv(False), budget))
            result["budget_s"] = round(budget, 1)
        result["json"] = step.json_name
        result["json_written"] = os.path.exists(os.path.join(out, step.json_name))
        parts.append(result)
        save_summary()

    save_summary(final=True)
    failed = [p["name"] for p in parts if p.get("skipped") or p.get("rc")]
    log(f"results in {out} ({time.monotonic() - t_start:.0f} s)" + (f"; FAILED or skipped: {', '.join(failed)}"
                                                                     if failed else ""))
    return 1 if failed else 0


# --------------------------------------------------------------------------- --check


def resolve_config(argv: Sequence[str]):
    """The ConfigDict a clrjax program would build from the ``--config...`` flags of ``argv``.

    The same parsing as experiments/train.py and experiments/benchmark.py: ml_collections'
    ``DEFINE_config_file`` on a fresh flag registry, the overrides applied in order.
    """
    from absl import flags
    from ml_collections import config_flags

    args = ["program", *[a for a in argv if a.startswith("--config")]]
    fv = flags.FlagValues()
    # sys_argv: ml_collections reads the overrides from it (default: this process's sys.argv)
    config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, lock_config=True, sys_argv=args)
    fv(args)
    config = fv["config"].value
    config.keys()  # ml_collections defers a config file's load errors to the first use
    return config


def flag_error(err: Exception) -> str:
    try:
        from clrjax import cli
        return cli.flag_error_text(err)
    except Exception:  # noqa: BLE001 - the message is what matters
        return f"{type(err).__name__}: {err}"


def check_configs(steps: Sequence[Step], log: Log, data_dir: Optional[str]) -> List[str]:
    """Resolves, validates and traces (builds and lowers, no compile) every clrjax config at full size."""
    from clrjax import benchmarking, config as config_lib  # imports jax: after check() set JAX_PLATFORMS, XLA_FLAGS

    problems = []
    for step in steps:
        if step.program not in ("experiments/benchmark.py", "experiments/train.py"):
            continue
        variants = [("", step.args)]
        if step.kind == "accuracy":  # the arguments the driver adds to each invocation
            variants = [(" (calibration)", [*step.args, "--config.num_epochs=1000"]),
                        (" (main run)", [*step.args, "--config.num_epochs=40"]),
                        (" (evaluation)", [*step.args, *EVALUATE_ARGS])]
        for label, args in variants:
            what = f"{step.name}{label}: python {shlex.join([step.program, *args])}"
            t0 = time.monotonic()
            try:
                config = resolve_config(args)
            except Exception as err:  # noqa: BLE001 - any flag/config error is a finding
                problems.append(f"{what}\n    config error: {flag_error(err)}")
                log(f"config FAILED {what}\n    config error: {flag_error(err)}")
                continue
            try:
                modes = next((a.split("=", 1)[1].split(",") for a in args if a.startswith("--mode=")), ["step", "input"])
                if step.kind != "accuracy" and modes == ["loss"]:
                    config_lib.validate_config(config, num_devices=1)
                    log(f"config ok     {step.name}{label} (loss mode: validated; the tiny run checks the losses)")
                    continue
                if step.kind == "accuracy":
                    if data_dir is None:  # no data here: the same shapes from synthetic images
                        config = config_lib.apply_overrides(config, {
                            "dataset.name": "synthetic", "dataset.image_size": 28, "dataset.channels": 1,
                            "dataset.num_examples": 60000})
                        label += " [synthetic stand-in: no Fashion-MNIST files here]"
                elif "--real_data" not in args:
                    config = benchmarking.synthetic_config(config)  # as experiments/benchmark.py does
                config_lib.validate_config(config, num_devices=1)
                # The accuracy part's three invocations differ only in their length: lower one.
                info = benchmarking.trace_step(config, lower=step.kind != "accuracy" or "main" in label)
            except Exception as err:  # noqa: BLE001
                text = str(err).strip().splitlines()[0] if str(err).strip() else ""
                problems.append(f"{what}\n    {type(err).__name__}: {text[:600]}")
                log(f"config FAILED {what}\n    {type(err).__name__}: {text[:600]}")
                continue
            log(f"config ok     {step.name}{label}: {json.dumps(info)} ({time.monotonic() - t0:.1f} s)")
    return problems


def check_carry(log: Log, require: bool) -> List[str]:
    """What travels: the wheels (Python 3.12, deps on the GPU), the data files, the size limit."""
    import zipfile
    problems, notes = [], []
    wheels = sorted(glob.glob(os.path.join(WHEELS_DIR, "*.whl")))
    found = {}
    for wheel in wheels:
        name, version, *rest = os.path.basename(wheel)[:-4].split("-")
        py, abi, plat = rest[-3:]
        found[normalise(name)] = wheel
        if not (py in ("py3", "cp312", "py312") or py.startswith("py3")) or not (plat == "any" or "x86_64" in plat):
            problems.append(f"{os.path.basename(wheel)} is not a wheel for CPython 3.12 on x86-64")
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            requires = [ln.split(":", 1)[1].strip() for ln in z.read(meta).decode().splitlines()
                        if ln.startswith("Requires-Dist:")]
        deps = {normalise(re.split(r"[\s;<>=!~\[(]", r, maxsplit=1)[0]) for r in requires if "extra ==" not in r}
        missing = sorted(d for d in deps if d not in GPU_PACKAGES and d not in found)
        if missing:
            problems.append(f"{os.path.basename(wheel)} needs {', '.join(missing)}, which the GPU machine lacks")
        log(f"carry: {os.path.basename(wheel)} ({os.path.getsize(wheel) / 1024:.0f} KiB), needs "
            f"{', '.join(sorted(deps)) or 'nothing'} (on the GPU)")
    for dist, req in CARRIED_WHEELS.items():
        if dist not in found:
            notes.append(f"no {req} wheel in {WHEELS_DIR}")
    if wheels:  # the exact install the GPU run does, offline, into a scratch dir
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                                   "--no-compile", "--no-cache-dir", "--target", tmp, *wheels],
                                  capture_output=True, text=True, timeout=180)
            if proc.returncode != 0:
                problems.append(f"the offline wheel install fails: {proc.stderr[-800:]}")
            else:
                log(f"carry: offline install of the wheels works ({dir_bytes(tmp) / 2**20:.1f} MiB installed)")
    for name, size in FASHION_FILES.items():
        path = os.path.join(FASHION_DIR, name)
        if not os.path.exists(path):
            notes.append(f"no {path}")
        elif os.path.getsize(path) != size:
            problems.append(f"{path} has {os.path.getsize(path)} bytes, not {size} (not the Fashion-MNIST release file)")
    carry_bytes = dir_bytes(CARRY) if os.path.isdir(CARRY) else 0
    tree = travelling_tree_bytes()
    if tree is not None:
        total = tree + carry_bytes
        log(f"carry: working tree {tree / 2**20:.1f} MiB + benchmarks/carry {carry_bytes / 2**20:.1f} MiB = "
            f"{total / 2**20:.1f} MiB travel (limit {CARRY_LIMIT_BYTES / 2**20:.0f} MiB)")
        if total > CARRY_LIMIT_BYTES:
            problems.append(f"{total / 2**20:.1f} MiB would travel, over the {CARRY_LIMIT_BYTES / 2**20:.0f} MiB limit")
    for note in notes:
        (problems.append if require else log)(f"carry not prepared: {note} (run: python benchmarks/gpu_run.py --prepare)")
    return problems


def check_plan(steps: Sequence[Step], budget_s: float) -> List[str]:
    problems = []
    names = [s.name for s in steps]
    files = output_files(steps)
    if len(set(names)) != len(names) or len(set(files)) != len(files):
        problems.append(f"step names or output files repeat: {names}, {files}")
    if len(files) > MAX_FILES_BACK:
        problems.append(f"{len(files)} output files, but at most {MAX_FILES_BACK} come back from the device")
    for f in files:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", f):
            problems.append(f"output file name {f!r} would not come back (letters, digits, '.', '_', '-')")
    if budget_s > COMMAND_BUDGET_S:
        problems.append(f"--budget_s={budget_s:g} exceeds the {COMMAND_BUDGET_S:g} s the command may take")
    need = SETUP_RESERVE_S + sum(s.min_s for s in steps)
    if need > budget_s:
        problems.append(f"the parts' minimum budgets and setup need {need:g} s, more than --budget_s={budget_s:g}")
    for s in steps:
        if not 0 < s.min_s <= s.max_s:
            problems.append(f"{s.name}: budget min {s.min_s} / max {s.max_s} s is not 0 < min <= max")
        if not os.path.isfile(os.path.join(ROOT, s.program)):
            problems.append(f"{s.name}: {s.program} does not exist")
    return problems


def check_imports(audits: Sequence[str], log: Log) -> List[str]:
    """Maps every module the tiny runs imported to its distribution; each must be on the GPU or carried."""
    from importlib import metadata

    owner: Dict[str, str] = {}
    for dist in metadata.distributions():
        name = normalise(dist.metadata["Name"] or "")
        for f in dist.files or ():
            owner[os.path.realpath(str(dist.locate_file(f)))] = name
    stdlib_roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    required: Dict[str, set] = collections.defaultdict(set)
    unowned, blocked = set(), set()
    for report in audits:
        rec = load_json(report)
        if not rec:
            continue
        program = rec["program"]
        blocked.update(rec.get("blocked_attempts", []))
        for path in rec["files"]:
            real = os.path.realpath(path)
            if real in owner:
                required[owner[real]].add(program)
            elif real.startswith(ROOT + os.sep) or any(real.startswith(r + os.sep) for r in stdlib_roots):
                continue  # this repository, or the standard library
            else:
                unowned.add(real)
    required.pop("clrjax", None)  # the repository itself (installed editable here; PYTHONPATH there)
    problems = []
    outside = sorted(d for d in required if d not in GPU_PACKAGES and d not in CARRIED_WHEELS)
    for d in outside:
        problems.append(f"the GPU run imports {d} (from {', '.join(sorted(required[d]))}), which the GPU machine "
                        "lacks and which does not travel as a wheel")
    for path in sorted(unowned):
        problems.append(f"the GPU run imports {path}, which belongs to no installed distribution")
    carried = sorted(d for d in required if d in CARRIED_WHEELS)
    log(f"imports: the GPU run needs {len(required)} distributions: {', '.join(sorted(required))}")
    log(f"imports: carried as wheels: {', '.join(carried) or 'none'}; absent there and never needed: "
        f"{', '.join(ABSENT_ON_GPU)} (tried but optional: {', '.join(sorted(blocked)) or 'none'})")
    return problems


def check_results(steps: Sequence[Step], out: str, tiny: Dict[str, dict], figures: dict) -> List[str]:
    problems = []
    for step in steps:
        res = tiny.get(step.name)
        if res is None:
            continue
        obj = load_json(os.path.join(out, step.json_name))
        if res.get("rc") not in (0, None) or obj is None:
            problems.append(f"{step.name}: the tiny run failed (exit {res.get('rc')}):\n{res.get('tail', '')[-2500:]}")
            continue
        if obj.get("complete") is False or "_unreadable" in obj:
            problems.append(f"{step.name}: {step.json_name} is incomplete or unreadable")
    wanted = {"resnet50": ["resnet50_images_per_s", "input_vs_step"],
              "torch_resnet50": ["torch_resnet50_images_per_s"], "vit_b16": ["vit_b16_images_per_s"],
              "accuracy": ["accuracy"], "losses": ["loss_rows"]}
    f = figures["figures"]
    for name, keys in wanted.items():
        if name in tiny and tiny[name].get("rc") == 0:
            for key in keys:
                if key not in f:
                    problems.append(f"the summary did not read {key} from {name}'s JSON")
    if "resnet50" in tiny and "torch_resnet50" in tiny and "resnet50_vs_torch" not in f:
        problems.append("the summary did not compute the clrjax/PyTorch ratio")
    if "accuracy" in f and f["accuracy"].get("linear_top1") is None:
        problems.append("the summary did not read the linear-probe accuracy")
    if f.get("loss_rows_failed"):
        problems.append(f"{f['loss_rows_failed']} loss rows failed in the tiny run")
    return problems


def check(args) -> int:
    t0 = time.monotonic()
    os.chdir(ROOT)
    os.environ["JAX_PLATFORMS"] = "cpu"          # this process traces on one CPU device
    os.environ["XLA_FLAGS"] = CHECK_XLA_FLAGS
    tmp = tempfile.mkdtemp(prefix="clrjax-gpu-check-")
    out = os.path.abspath(args.out or os.path.join(tmp, "out"))
    os.makedirs(out, exist_ok=True)
    log = Log(os.path.join(out, "driver.log"))
    data_dir = fashion_data_dir()
    steps = build_plan(out, data_dir or FASHION_DIR, args.append)
    selected = [s for s in steps if not args.parts or s.name in args.parts]
    log(f"check: {len(selected)} steps, Fashion-MNIST {'from ' + data_dir if data_dir else 'absent here'}, "
        f"scratch {tmp}")
    problems = check_plan(steps, args.budget_s)
    problems += check_carry(log, args.require_carry)
    problems += check_configs(selected, log, data_dir)
    if problems:  # a config error never gets to the tiny runs (nor to a GPU)
        return report_check(problems, t0, log)

    env = child_env(True, os.path.join(tmp, "work"), None)
    os.makedirs(env["CLRJAX_GPU_WORK"], exist_ok=True)
    runner = Runner(env, log, audit_dir=tmp)
    tiny: Dict[str, dict] = {}
    for step in selected:
        if step.program.endswith("torch_reference.py") and not _has_module("torch"):
            log(f"check: {step.name} skipped: torch is not installed here")
            continue
        if step.kind == "accuracy":
            rec = run_accuracy(step, runner, out, CHECK_STEP_TIMEOUT_S * 3, check=True)
            tiny[step.name] = {"rc": 0 if rec.get("complete") else 1, "tail": rec.get("error", "")}
            if rec.get("complete") and not rec.get("stopped_early"):
                problems.append("accuracy: the check's training run was meant to be stopped by the driver")
        else:
            tiny[step.name] = runner.run(step.name, step.argv(True), CHECK_STEP_TIMEOUT_S)
    figures = summarize(out, log)
    problems += check_results(selected, out, tiny, figures)
    problems += check_imports(runner.audits, log)
    shutil.rmtree(env["CLRJAX_GPU_WORK"], ignore_errors=True)   # checkpoints and caches of the tiny runs
    return report_check(problems, t0, log)


def _has_module(name: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(name) is not None


def report_check(problems: List[str], t0: float, log: Log) -> int:
    took = time.monotonic() - t0
    if problems:
        log(f"CHECK FAILED ({took:.0f} s):")
        for p in problems:
            log(f"  - {p}")
        return 1
    log(f"check passed in {took:.0f} s: every config resolves and traces at full size, every part ran one "
        "tiny step, the summary read each JSON, the imports are on the GPU machine or travel")
    return 0


# --------------------------------------------------------------------------- --prepare


def prepare(args) -> int:
    """Fills benchmarks/carry/ (git-ignored) with what the GPU run needs and the machine lacks."""
    os.makedirs(WHEELS_DIR, exist_ok=True)
    os.makedirs(FASHION_DIR, exist_ok=True)
    for dist, req in CARRIED_WHEELS.items():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", "-d", WHEELS_DIR, req]
        print(f"prepare: {shlex.join(cmd)}", flush=True)
        subprocess.run(cmd, check=True)
    source = args.fashion_mnist_dir
    for name in FASHION_FILES:
        src, dst = os.path.join(source, name), os.path.join(FASHION_DIR, name)
        if not os.path.exists(src):
            print(f"prepare: {src} is missing: `apt-get install dataset-fashion-mnist` (files in "
                  f"{SYSTEM_FASHION_DIR}) or pass --fashion_mnist_dir", file=sys.stderr)
            return 1
        if not os.path.exists(dst) or os.path.getsize(dst) != os.path.getsize(src):
            shutil.copyfile(src, dst)
    for path in sorted(glob.glob(os.path.join(CARRY, "*", "*"))):
        print(f"prepare: {os.path.relpath(path, ROOT)} {os.path.getsize(path) / 2**20:.2f} MiB")
    carry_bytes = dir_bytes(CARRY)
    tree = travelling_tree_bytes() or 0
    print(f"prepare: benchmarks/carry {carry_bytes / 2**20:.1f} MiB + working tree {tree / 2**20:.1f} MiB = "
          f"{(carry_bytes + tree) / 2**20:.1f} MiB of {CARRY_LIMIT_BYTES / 2**20:.0f} MiB; carry: [\"benchmarks/carry\"]")
    return 0


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="CPU check of the whole run (the test suite runs it)")
    mode.add_argument("--prepare", action="store_true", help="fill benchmarks/carry (needs the network)")
    mode.add_argument("--summarize", metavar="DIR", help="print the summary of a results directory")
    p.add_argument("--out", default=None, help="results directory (GPU run: default benchmark_results/gpu)")
    p.add_argument("--budget_s", type=float, default=COMMAND_BUDGET_S, help="the whole command's time budget")
    p.add_argument("--parts", type=lambda v: [x for x in v.split(",") if x], default=None,
                   help="run only these steps (resnet50,torch_resnet50,vit_b16,accuracy,losses)")
    p.add_argument("--append", action="append", default=[], metavar="NAME=ARG",
                   help="append ARG to step NAME's command line (repeatable), e.g. resnet50=--config.optimizer.name=lars")
    p.add_argument("--require_carry", action="store_true", help="--check: fail when benchmarks/carry is not prepared")
    p.add_argument("--allow_no_gpu", action="store_true", help="run the parts even when JAX sees no GPU")
    p.add_argument("--fashion_mnist_dir", default=SYSTEM_FASHION_DIR, help="--prepare: where the .gz files are")
    args = p.parse_args(argv)
    if args.parts:
        known = {s.name for s in build_plan("", "")}
        unknown = [x for x in args.parts if x not in known]
        if unknown:
            p.error(f"--parts: unknown {unknown}; use some of {', '.join(sorted(known))}")
    if args.check:
        return check(args)
    if args.prepare:
        return prepare(args)
    if args.summarize:
        summarize(args.summarize)
        return 0
    args.out = args.out or os.path.join(ROOT, "benchmark_results", "gpu")
    return gpu_run(args)


if __name__ == "__main__":
    sys.exit(main())
