"""launch/hyper.py and launch/sweep.py: expansion, validation, local runs, results collection."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from launch import hyper, sweep
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SWEEP = os.path.join(ROOT, "launch", "sweep.py")
CONFIG = os.path.join(ROOT, "configs", "simclr.py") + ":digits"
EXAMPLE = os.path.join(ROOT, "launch", "sweeps", "simclr_digits_temp_lr.py")
TINY = ("--config.model.widths=(8,16,16,16) --config.projector.hidden_dims=(32,) "
        "--config.projector.out_dim=16 --config.batch_size=64 --config.num_steps=4 "
        "--config.log_every_steps=2 --config.checkpoint.every_steps=4 "
        "--config.optimizer.warmup_epochs=0 --config.eval.final=False")


def write_sweep(tmp_path, body, name="my_sweep"):
    path = tmp_path / f"{name}.py"
    path.write_text("from launch import hyper\n" + textwrap.dedent(body))
    return str(path)


# --------------------------------------------------------------------------- hyper


def test_product_varies_the_last_list_fastest():
    runs = hyper.product(hyper.sweep("a", [1, 2]), hyper.sweep("b", ["x", "y"]))
    assert runs == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]


def test_zipit_pairs_elementwise_and_composes_with_product():
    runs = hyper.product(hyper.fixed("c", 0), hyper.zipit(hyper.sweep("a", [1, 2]), hyper.sweep("b", [3, 4])))
    assert runs == [{"c": 0, "a": 1, "b": 3}, {"c": 0, "a": 2, "b": 4}]


@pytest.mark.parametrize("build, message", [
    (lambda: hyper.zipit(hyper.sweep("a", [1, 2]), hyper.sweep("b", [1])), "lengths"),
    (lambda: hyper.product(hyper.sweep("a", [1]), hyper.sweep("a", [2])), "twice"),
    (lambda: hyper.sweep("a", []), "no values"),
    (lambda: hyper.sweep("a", "0.1"), "list of values"),
])
def test_hyper_rejects_ambiguous_sweeps(build, message):
    with pytest.raises(ValueError, match=message):
        build()


# --------------------------------------------------------------------------- validation and naming


def test_example_sweep_expands_into_readable_unique_workdirs(tmp_path):
    runs = sweep.prepare(EXAMPLE, CONFIG, str(tmp_path))
    assert len(runs) == 9
    names = [r.name for r in runs]
    assert len(set(names)) == 9
    assert names[0] == "simclr_digits_temp_lr-temperature=0.1-lr=0.001"
    first = runs[0].argv
    assert first[1] == sweep.TRAIN_SCRIPT and f"--workdir={tmp_path}/{names[0]}" in first
    assert first[-2:] == ["--config.loss.temperature=0.1", "--config.optimizer.lr=0.001"]


def test_keys_are_shortened_only_while_unique():
    assert sweep.short_keys(["optimizer.lr", "probe.lr", "loss.temperature"]) == {
        "optimizer.lr": "optimizer.lr", "probe.lr": "probe.lr", "loss.temperature": "temperature"}


def test_names_are_sanitised_and_bounded():
    name = sweep.run_name("s", {"model.widths": (8, 16), "dataset.data_dir": "/a b/c"}, {})
    assert name == "s-model.widths=8,16-dataset.data_dir=_a_b_c"
    long = sweep.run_name("s", {"x": "v" * 500}, {})
    assert len(long) == sweep.MAX_NAME_CHARS and long != sweep.run_name("s", {"x": "v" * 499}, {})


def test_flag_values_parse_as_ml_collections_expects():
    assert sweep.flag_value((8, 16)) == "(8,16)" and sweep.flag_value((32,)) == "(32,)"
    assert sweep.flag_value(1e-3) == "0.001" and sweep.flag_value(True) == "True"


@pytest.mark.parametrize("body, message", [
    ("X = 1\n", "defines no get_sweep"),
    ("def get_sweep():\n    return [{'optimizer.lr': 1e-3}, 0.1]\n", "entry 1 .* not a dict"),
    ("def get_sweep():\n    return []\n", "non-empty list"),
    ("def get_sweep():\n    return [{'optimizer.lrr': 1e-3}]\n", "optimizer.lrr.*not a known field"),
    ("def get_sweep():\n    return [{'optimizer.lr': 'fast'}]\n", "entry 0"),
    ("def get_sweep():\n    return [{'seed': 1}, {'seed': 1}]\n", "entries 0 and 1"),
    ("import nope_not_a_module\n", "importing the sweep file"),
])
def test_bad_sweep_files_fail_before_anything_runs(tmp_path, body, message):
    path = write_sweep(tmp_path, body)
    root = tmp_path / "root"
    with pytest.raises(sweep.SweepError, match=message):
        sweep.prepare(path, CONFIG, str(root))
    assert not root.exists()


def test_extra_flags_are_checked_against_the_config_and_the_sweep(tmp_path):
    with pytest.raises(sweep.SweepError, match="not a config field"):
        sweep.prepare(EXAMPLE, CONFIG, str(tmp_path), extra="--config.optimiser.lr=1")
    with pytest.raises(sweep.SweepError, match="also varies"):
        sweep.prepare(EXAMPLE, CONFIG, str(tmp_path), extra="--config.optimizer.lr=1")
    runs = sweep.prepare(EXAMPLE, CONFIG, str(tmp_path), extra="--config.num_steps=4 --config.loss.decoupled=True")
    assert "--config.num_steps=4" in runs[0].argv


def test_cli_dry_run_and_cluster_emitters(tmp_path):
    base = [sys.executable, SWEEP, "run", EXAMPLE, f"--config={CONFIG}", f"--workdir={tmp_path}/r"]
    dry = subprocess.run(base + ["--dry_run"], capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert len(dry.stdout.strip().splitlines()) == 9 and not (tmp_path / "r").exists()

    slurm = subprocess.run(base + ["--emit=slurm", "--parallel=3"], capture_output=True, text=True, timeout=60)
    assert slurm.returncode == 0, slurm.stderr
    script = tmp_path / "r" / "sweep_array.sbatch"
    text = script.read_text()
    assert "#SBATCH --array=0-8%3" in text and "#SBATCH --signal=TERM@120" in text
    assert '--only="$RUN"' in text and "scontrol requeue" in text
    assert "#SBATCH --gpus-per-node=1" in text and "#SBATCH --time=04:00:00" in text  # defaults
    assert f'PYTHON="${{CLRJAX_PYTHON:-{sys.executable}}}"' in text  # the emitting interpreter
    assert "\ncd " not in text  # runs in $SLURM_SUBMIT_DIR, not in the checkout that emitted it
    subprocess.run(["bash", "-n", str(script)], check=True)

    custom = subprocess.run(base + ["--emit=slurm", "--python=/opt/env/bin/python", "--slurm_nodes=2",
                                    "--slurm_gpus_per_node=4", "--slurm_cpus_per_task=16", "--slurm_time=1-00:00:00",
                                    "--slurm_partition=gpu", "--slurm_account=proj"],
                            capture_output=True, text=True, timeout=60)
    assert custom.returncode == 0, custom.stderr
    text = script.read_text()
    for line in ("--nodes=2", "--gpus-per-node=4", "--cpus-per-task=16", "--time=1-00:00:00",
                 "--partition=gpu", "--account=proj"):
        assert f"#SBATCH {line}\n" in text
    assert 'PYTHON="${CLRJAX_PYTHON:-/opt/env/bin/python}"' in text
    assert "--extra=--local_device_ids=0,1,2,3" in text  # one process per node drives its 4 GPUs

    tpu = subprocess.run(base + ["--emit=tpu"], capture_output=True, text=True, timeout=60)
    assert tpu.returncode == 0, tpu.stderr
    lines = [l for l in (tmp_path / "r" / "tpu_commands.sh").read_text().splitlines()
             if l.startswith("launch/tpu_pod.sh run")]
    assert len(lines) == 9 and "--config.loss.temperature=0.1 --config.optimizer.lr=0.001" in lines[0]

    bad = subprocess.run(base[:3] + [str(tmp_path / "missing.py")] + base[4:], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("field, value, message", [
    ("nodes", 0, "--slurm_nodes"), ("gpus_per_node", -1, "--slurm_gpus_per_node"),
    ("cpus_per_task", 0, "--slurm_cpus_per_task"), ("time", "4h", "--slurm_time"),
    ("partition", "a b", "--slurm_partition"),
])
def test_bad_slurm_resources_fail_before_the_script_is_written(tmp_path, field, value, message):
    resources = sweep.SlurmResources(**{field: value})
    with pytest.raises(sweep.SweepError, match=message):
        sweep.emit_slurm([], str(tmp_path), EXAMPLE, CONFIG, "", 1, resources)
    assert not (tmp_path / "sweep_array.sbatch").exists()


# --------------------------------------------------------------------------- GPUs of local runs


def test_visible_gpus_come_from_cuda_visible_devices_else_nvidia_smi():
    assert sweep.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3, 5"}, list_gpus=lambda: ["0"]) == ["2", "3", "5"]
    assert sweep.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, list_gpus=lambda: ["0"]) == []
    assert sweep.visible_gpus({}, list_gpus=lambda: ["0", "1"]) == ["0", "1"]


@pytest.mark.parametrize("gpus, parallel, per_run, slots", [
    ([], 4, None, None),                                       # CPU-only machine: nothing changes
    (["0", "1", "2", "3"], 1, None, None),                     # one run at a time sees every GPU
    (["0", "1", "2", "3"], 2, None, [["0", "1"], ["2", "3"]]),
    (["0", "1", "2", "3", "4"], 2, None, [["0", "1"], ["2", "3"]]),
    (["0", "1", "2", "3"], 2, 1, [["0"], ["1"]]),
    (["4", "6"], 2, None, [["4"], ["6"]]),                      # ids of a narrowed CUDA_VISIBLE_DEVICES
])
def test_concurrent_local_runs_get_disjoint_gpus(gpus, parallel, per_run, slots):
    assert sweep.gpu_slots(gpus, parallel, per_run) == slots


@pytest.mark.parametrize("gpus, parallel, per_run", [(["0", "1"], 3, None), (["0", "1", "2", "3"], 2, 3)])
def test_runs_that_cannot_get_their_own_gpus_are_refused(gpus, parallel, per_run):
    with pytest.raises(sweep.SweepError, match=f"{len(gpus)} are visible.*--parallel="):
        sweep.gpu_slots(gpus, parallel, per_run)


def test_each_running_run_sees_its_slot_and_slots_are_reused(tmp_path):
    code = "import os, time; print('gpus=' + os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(0.5)"
    runs = [sweep.Run(f"r{i}", str(tmp_path / f"r{i}"), {"i": i}, [sys.executable, "-c", code]) for i in range(3)]
    results = sweep.run_local(runs, parallel=2, slots=[["0", "1"], ["2", "3"]])
    assert set(results.values()) == {"done"}
    seen = [(tmp_path / f"r{i}" / "log.txt").read_text().strip() for i in range(3)]
    assert seen[0] == "gpus=0,1" and seen[1] == "gpus=2,3" and seen[2] in ("gpus=0,1", "gpus=2,3")


def test_cli_refuses_more_parallel_runs_than_gpus(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    proc = subprocess.run([sys.executable, SWEEP, "run", EXAMPLE, f"--config={CONFIG}", f"--workdir={tmp_path}/r",
                           "--parallel=3"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "2 are visible (0,1); pass --parallel=2" in proc.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written or started


# --------------------------------------------------------------------------- running (fake commands)


def fake_run(root, name, code):
    script = f"import sys; print('working'); print('config error: bad {name}') if {code} else None; sys.exit({code})"
    return sweep.Run(name, os.path.join(root, name), {"x": name}, [sys.executable, "-c", script])


def test_run_local_records_failures_and_skips_finished_runs(tmp_path):
    runs = [fake_run(str(tmp_path), "bad", 3), fake_run(str(tmp_path), "a", 0), fake_run(str(tmp_path), "b", 0)]
    assert sweep.run_local(runs, parallel=2) == {"bad": "failed", "a": "done", "b": "done"}
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["exit_code"] == 3 and status["error"] == "config error: bad bad"
    assert "working" in (tmp_path / "a" / "log.txt").read_text()
    # Re-running the sweep (the resume path) skips what finished and retries the rest.
    runs[1].argv = [sys.executable, "-c", "raise SystemExit(9)"]
    assert sweep.run_local(runs, parallel=2)["a"] == "done"
    assert json.loads((tmp_path / "a" / "status.json").read_text())["exit_code"] == 0


# --------------------------------------------------------------------------- collecting (fake run dirs)


def fake_run_dir(root, name, overrides, status=None, eval_top1=None, loss=None, code=0):
    path = root / name
    path.mkdir()
    if status:
        (path / "status.json").write_text(json.dumps({"status": status, "exit_code": code, "overrides": overrides,
                                                      "error": "" if code == 0 else "boom"}))
    if loss is not None:
        rows = [{"step": 2, "loss": loss + 1}, {"step": 4, "loss": loss}]
        (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 6, \"lo")
    if eval_top1 is not None:
        (path / "eval.json").write_text(json.dumps({"pretrained": {"linear_top1": eval_top1}}))
    (path / "config.json").write_text(json.dumps({"num_steps": 4}))


def test_collect_sorts_by_metric_and_lists_failed_runs_last(tmp_path):
    fake_run_dir(tmp_path, "r1", {"lr": 0.1}, "done", eval_top1=0.8, loss=1.0)
    fake_run_dir(tmp_path, "r2", {"lr": 0.2}, "done", eval_top1=0.9, loss=2.0)
    fake_run_dir(tmp_path, "r3", {"lr": 0.4}, "failed", code=3)
    fake_run_dir(tmp_path, "r4", {"lr": 0.3}, None, eval_top1=0.85)  # no status.json (e.g. a TPU run):
    (tmp_path / "sweep.json").write_text(json.dumps({"runs": {"r4": {"overrides": {"lr": 0.3}}}}))  # manifest
    rows = sweep.collect(str(tmp_path))
    assert [r["run"] for r in rows] == ["r2", "r4", "r1", "r3"]
    assert rows[1]["status"] == "done"
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [t["lr"] for t in table] == ["0.2", "0.3", "0.1", "0.4"]
    assert table[-1]["status"] == "failed (exit 3)" and table[-1]["pretrained.linear_top1"] == ""
    assert table[2]["loss"] == "1"  # the torn last line of metrics.jsonl is skipped
    assert "failed (exit 3)" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "results.png").stat().st_size > 0

    by_loss = sweep.collect(str(tmp_path), metric="loss", mode="min")
    assert [r["run"] for r in by_loss][:2] == ["r1", "r2"]
    with pytest.raises(sweep.SweepError, match="no finished run reports the metric 'knn99'"):
        sweep.collect(str(tmp_path), metric="knn99")
    with pytest.raises(sweep.SweepError, match="--mode"):
        sweep.collect(str(tmp_path), mode="best")


# --------------------------------------------------------------------------- end to end


def test_sweep_runs_locally_and_a_failed_run_does_not_stop_the_others(tmp_path):
    """2 tiny digits runs (temperature x lr, run side by side) plus one invalid entry, then collect.
    (hyper.product's expansion of larger grids is unit-tested above; two runs are enough for
    --parallel and the ordering, and each run costs a process start and a compile.)"""
    path = write_sweep(tmp_path, """
        def get_sweep():
            bad = [{"loss.temperature": -1.0, "optimizer.lr": 1e-3}]  # rejected by the run's validation
            return bad + hyper.product(hyper.sweep("loss.temperature", [0.1, 0.5]),
                                       hyper.sweep("optimizer.lr", [3e-3]))
        """, name="tiny")
    root = tmp_path / "root"
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, SWEEP, "run", path, f"--config={CONFIG}", f"--workdir={root}",
                           "--parallel=2", f"--extra={TINY}"], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one run failed
    assert "2/3 runs done" in proc.stdout

    col = subprocess.run([sys.executable, SWEEP, "collect", str(root), "--metric=loss", "--mode=min"],
                         capture_output=True, text=True, timeout=120)
    assert col.returncode == 0, col.stderr
    with open(root / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3
    done = [t for t in table if t["status"] == "done"]
    assert len(done) == 2
    assert len({(t["loss.temperature"], t["optimizer.lr"]) for t in done}) == 2
    assert len({t["loss"] for t in done}) == 2 and all(t["step"] == "4" for t in done)
    assert [float(t["loss"]) for t in done] == sorted(float(t["loss"]) for t in done)
    failed = table[-1]
    assert failed["status"] == "failed (exit 3)" and failed["loss.temperature"] == "-1"
    assert "config.loss.temperature" in failed["error"]
    assert (root / "results.png").exists() and "failed (exit 3)" in (root / "results.md").read_text()
