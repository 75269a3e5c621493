"""benchmarks/gpu_run.py, the one command of the GPU session, can never reach a GPU broken.

``--check`` runs on CPU: it resolves, validates and lowers every config of the GPU run at full
size, runs each part for one tiny step through the same driver code, reads each JSON back with
the summary code and audits the imports against the GPU machine's packages. These tests run it,
show that it fails (naming the part) on a bad config, and unit-test the driver's own logic:
the summary, the budgets and the timeouts.
"""
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "benchmarks", "gpu_run.py")
AUDIT = os.path.join(ROOT, "benchmarks", "import_audit.py")


@pytest.fixture(scope="module")
def gpu_run():
    spec = importlib.util.spec_from_file_location("gpu_run", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_run"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_run", None)


def _driver(*args, timeout=600):
    return subprocess.run([sys.executable, DRIVER, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_check_passes(tmp_path):
    """The whole ``--check`` (92 s of the suite's 15 min on 2 cores, so behind ``slow``; a GPU
    session runs it first anyway, before any device time). Its pieces are covered by faster
    tests: the full-size config checks by test_check_fails_on_a_bad_config_naming_it (the same
    check_configs pass, stopped by one bad entry), the driver's budgets, timeouts and summary by
    the unit tests below, the parts' programs by tests/test_benchmark.py (experiments/benchmark.py
    modes) and tests/test_preemption.py (the SIGTERM-save-resume path the accuracy part takes)."""
    t0 = time.monotonic()
    proc = _driver("--check", f"--out={tmp_path}")
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "check passed" in out
    # every clrjax config of the GPU run, at its full size, lowered on CPU
    for label in ("resnet50:", "vit_b16:", "accuracy (calibration)", "accuracy (main run)",
                  "accuracy (evaluation)", "losses"):
        assert f"config ok     {label}" in out, label
    assert '"batch_image_shape": [256, 256, 256, 3]' in out      # ResNet-50 / ViT-B at B=256, 256 px
    assert '"batch_image_shape": [256, 28, 28, 1]' in out        # Fashion-MNIST at B=256
    # each part ran and wrote its JSON, which the summary read
    summary = [ln for ln in out.splitlines() if ln.startswith(("ResNet-50", "input pipeline", "ViT-B/16",
                                                                "Fashion-MNIST", "losses:"))]
    assert len(summary) == 5, summary
    for name in ("clrjax_resnet50_sgd.json", "clrjax_vitb16.json", "accuracy_fashion_mnist.json",
                 "clrjax_losses.json", "driver.log"):
        assert (tmp_path / name).exists(), name
    acc = json.loads((tmp_path / "accuracy_fashion_mnist.json").read_text())
    # the check takes the time-budget path on purpose: stopped by SIGTERM, then evaluated
    assert acc["complete"] and acc["stopped_early"]
    assert [r["name"] for r in acc["runs"]] == ["accuracy_calibrate", "accuracy_train", "accuracy_evaluate"]
    assert [r["rc"] for r in acc["runs"]] == [0, 75, 0]
    assert set(acc["eval"]) >= {"pretrained", "random_init", "steps"}
    assert 0 <= acc["eval"]["pretrained"]["linear_top1"] <= 1
    # the imports: what the GPU run needs is there or travels; grain and TFDS are never needed
    imports = next(ln for ln in out.splitlines() if ln.startswith("imports: the GPU run needs"))
    for dist in ("jax", "flax", "optax", "orbax-checkpoint", "ml-collections"):
        assert f" {dist}," in imports or imports.endswith(f" {dist}"), dist
    for dist in ("grain", "tensorflow-datasets", "tensorflow,"):
        assert dist not in imports
    assert "carried as wheels: ml-collections" in out
    assert took < 240, f"--check took {took:.0f} s"


def test_check_fails_on_a_bad_config_naming_it(tmp_path):
    # The failure the old script would have met on the GPU: --config.model.name on a preset.
    proc = _driver("--check", f"--out={tmp_path}", "--append", "resnet50=--config.model.name=vit_base",
                   timeout=300)
    assert proc.returncode == 1, proc.stdout[-4000:]
    report = proc.stdout[proc.stdout.index("CHECK FAILED"):]
    assert "resnet50: python experiments/benchmark.py" in report
    assert "--config.model.name=vit_base" in report and "error" in report.split("resnet50: python")[1].lower()
    assert "vit_b16" not in report                  # only the bad one is named
    assert "=== resnet50" not in proc.stdout         # a config error never reaches the tiny runs


def test_append_rejects_unknown_step(gpu_run):
    with pytest.raises(SystemExit, match="NAME=ARG"):
        gpu_run.build_plan("/out", "/data", ["resnet_50=--steps=1"])


def test_plan_fits_the_device_limits(gpu_run):
    steps = gpu_run.build_plan("/out", "/data")
    assert gpu_run.check_plan(steps, gpu_run.COMMAND_BUDGET_S) == []
    assert [s.part for s in steps] == sorted(s.part for s in steps)       # in order of value
    assert len(gpu_run.output_files(steps)) <= gpu_run.MAX_FILES_BACK
    # budgets: a part's budget never eats the later parts' minimums
    tight = gpu_run.check_plan(steps, 300)
    assert tight and "minimum budgets" in tight[0]
    assert gpu_run.check_plan(steps, 600) and "exceeds" in gpu_run.check_plan(steps, 600)[0]


def test_budget_for_keeps_later_minimums(gpu_run):
    steps = gpu_run.build_plan("/out", "/data")
    later = sum(s.min_s for s in steps[1:])
    assert gpu_run.budget_for(steps, 0, 1000.0) == steps[0].max_s
    assert gpu_run.budget_for(steps, 0, later + 70.0) == 70.0
    assert gpu_run.budget_for(steps, len(steps) - 1, 10.0) == 10.0     # below min_s: the caller skips it


def _write(path, obj):
    path.write_text(json.dumps(obj))


def test_summary_ratios_targets_and_partial_files(gpu_run, tmp_path):
    _write(tmp_path / "clrjax_resnet50_sgd.json", {
        "complete": True, "step": [{"images_per_s": 2600.0, "mfu": 0.3, "batch_size": 256}],
        "input": {"host_plus_augment_images_per_s": 5200.0, "host_to_step_ratio": 10.0, "input_to_step_ratio": 2.0},
        "input_to_step_ratio": 2.0, "config": {"model": {"name": "resnet50"}}})
    _write(tmp_path / "torch_resnet50.json", {"images_per_s": 2000.0})
    _write(tmp_path / "clrjax_vitb16.json", {"complete": False, "step": [
        {"images_per_s": 900.0, "mfu": 0.35, "batch_size": 256, "flops_per_step": 2.6e13}]})
    _write(tmp_path / "accuracy_fashion_mnist.json", {
        "complete": True, "epochs_trained": 30.0, "trained_steps": 7020, "train_elapsed_s": 150.0,
        "eval": {"pretrained": {"linear_top1": 0.9, "knn200_top1": 0.88, "knn20_top1": 0.89},
                 "random_init": {"linear_top1": 0.8, "knn200_top1": 0.75}, "steps": 7020}})
    (tmp_path / "clrjax_losses.json").write_text("{not json")
    lines = []
    s = gpu_run.summarize(str(tmp_path), lines.append)
    f = s["figures"]
    assert f["resnet50_vs_torch"] == pytest.approx(1.3)
    targets = {t["name"]: t["met"] for t in s["targets"]}
    assert targets == {"resnet50_vs_torch": True, "input_vs_step": True, "vit_b16_mfu": False}
    assert f["accuracy"]["linear_top1"] == 0.9 and f["accuracy"]["random_init_linear_top1"] == 0.8
    assert s["incomplete"] == ["clrjax_vitb16.json"]
    assert s["missing"] and s["missing"][0].startswith("clrjax_losses.json (")
    text = "\n".join(lines)
    assert "1.30x (target >= 1.3x: MET)" in text and "2.00x the step" in text
    assert "MFU 35.0%" in text and "(target >= 40%: MISSED)" in text
    assert "linear top-1 0.9000 (random init 0.8000)" in text
    # nothing measured at all: every target n/a, nothing raises
    empty = gpu_run.summarize(str(tmp_path / "nothing"), lambda _m: None)
    assert all(t["met"] is None for t in empty["targets"]) and len(empty["missing"]) == 5


def test_runner_stops_a_command_at_its_budget(gpu_run, tmp_path):
    log = gpu_run.Log(str(tmp_path / "driver.log"))
    runner = gpu_run.Runner(dict(os.environ), log)
    t0 = time.monotonic()
    res = runner.run("sleeper", ["-c", "import time; print('started', flush=True); time.sleep(60)"], 2.0)
    assert res["timed_out"] and res["rc"] != 0 and time.monotonic() - t0 < 30
    assert "started" in res["tail"] and "sleeper" in (tmp_path / "driver.log").read_text()
    # (the marker is computed: the logged command line must not contain it)
    ready = lambda: "handler-installed" in (tmp_path / "driver.log").read_text()  # noqa: E731
    res = runner.run("soft", ["-c", "import signal, sys, time\n"
                              "signal.signal(signal.SIGTERM, lambda *a: sys.exit(75))\n"
                              "print('handler', 'installed', sep='-', flush=True)\n"
                              "time.sleep(60)"], 30.0, soft_stop=ready)
    assert res["soft_stopped"] and res["rc"] == 75 and not res["timed_out"]


def test_import_audit_hides_modules_like_an_absent_package(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text("import importlib.util, json, sys\n"
                      "print(json.dumps([importlib.util.find_spec('json') is not None,\n"
                      "                  importlib.util.find_spec('pytest') is None]))\n"
                      "import pytest\n")
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, AUDIT, str(report), "pytest,_pytest", str(script)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "ModuleNotFoundError" in proc.stderr
    assert json.loads(proc.stdout.splitlines()[0]) == [True, True]
    rec = json.loads(report.read_text())
    assert rec["blocked_attempts"] == ["pytest"] and "json" in rec["modules"]
    assert any(f.endswith(os.path.join("json", "__init__.py")) for f in rec["files"])
