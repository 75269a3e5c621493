"""The experiments/train.py CLI on an image folder: class names in config.json, skipped bad input
counted in data_errors.json, a bad image failing with exit 3 and one line naming it."""
import json
import os
import subprocess
import sys

from tests.data.test_folders import write_folder
from tests.data.test_folders_train import ROOT, TINY


def _cli(config_arg, workdir, *overrides):
    args = [sys.executable, os.path.join(ROOT, "experiments", "train.py"), f"--config={config_arg}",
            f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_cli_records_class_names_counts_skipped_input_and_fails_on_bad_input(tmp_path):
    root = write_folder(str(tmp_path / "data"), n_per_class=12)
    os.rename(os.path.join(root, "three", "img_00.png"), os.path.join(root, "three", "img_00.jpg"))
    with open(os.path.join(root, "three", "img_01.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff not really a JPEG")
    tiny = [(k, repr(v) if isinstance(v, tuple) else v) for k, v in dict(TINY, **{"dataset.image_size": 0}).items()]
    spec = os.path.join(ROOT, "configs", "simclr.py:image_folder")
    failed = _cli(spec, tmp_path / "failed", *tiny, ("dataset.path", root))
    assert failed.returncode == 3, failed.stderr[-2000:]
    lines = [line for line in failed.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("[process 0] data error: ") and "three/img_01.jpg: cannot be decoded" in lines[-1]
    assert "Traceback" not in failed.stderr
    run = _cli(spec, tmp_path / "run", *tiny, ("dataset.path", root), ("dataset.on_error", "skip"))
    assert run.returncode == 0, run.stderr[-2000:]
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["dataset"]["class_names"] == ["one", "three", "two"]
    errors = json.load(open(tmp_path / "run" / "data_errors.json"))
    assert errors["skipped"] == 1 and errors["first_files"][0]["path"].endswith("three/img_01.jpg")
    assert "Skipped 1 bad inputs of the training split" in run.stdout
