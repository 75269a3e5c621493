"""experiments/train.py end to end in a subprocess, as a user runs it."""
import json
import os
import subprocess
import sys
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = [
    "--config.model.widths=(8,16,16,16)", "--config.projector.hidden_dims=(32,)",
    "--config.projector.out_dim=16", "--config.batch_size=64", "--config.num_steps=6",
    "--config.log_every_steps=2", "--config.checkpoint.every_steps=3",
    "--config.eval.knn_k=(5,20)", "--config.optimizer.warmup_epochs=0.0",
]


def run_cli(workdir, *extra, devices=2):
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices),
               JAX_PLATFORMS="cpu")
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
           "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits",
           f"--workdir={workdir}", *TINY, *extra]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_train_cli_end_to_end(tmp_path):
    workdir = tmp_path / "run"
    proc = run_cli(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "curves.png", "eval.json"):
        assert (workdir / name).exists(), name
    assert any(p.startswith("events") for p in os.listdir(workdir / "tensorboard"))
    assert sorted(os.listdir(workdir / "checkpoints"))[-1] == "6"
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["num_steps"] == 6 and saved["model"]["widths"] == [8, 16, 16, 16]
    report = json.loads((workdir / "eval.json").read_text())
    for arm in ("pretrained", "random_init"):
        for key in ("linear_top1", "linear_top5", "knn5_top1", "knn20_top1"):
            assert 0.0 <= report[arm][key] <= 1.0
    assert "pretrained" in proc.stdout and str(workdir) in proc.stdout

    # A finished run re-run reports the saved results and exits.
    again = run_cli(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "pretrained" in again.stdout


def test_train_cli_config_error_is_one_sentence(tmp_path):
    proc = run_cli(tmp_path / "bad", "--config.loss.temperature=-1.0")
    assert proc.returncode == 3
    assert "config.loss.temperature" in proc.stderr and "positive" in proc.stderr
    assert not (tmp_path / "bad").exists()  # nothing is created for a config that cannot run


def test_train_cli_model_name_change_points_to_the_encoder_option(tmp_path):
    proc = run_cli(tmp_path / "bad", "--config.model.name=resnet18")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "stem_stride" in proc.stderr and ",encoder=resnet18" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_train_cli_non_finite_exits_4_with_one_line(tmp_path):
    # An absurd learning rate makes the parameters non-finite after the first update.
    proc = run_cli(tmp_path / "nan", "--config.optimizer.lr=1e30", "--config.nonfinite.policy=stop")
    assert proc.returncode == 4, proc.stderr[-2000:]
    assert "[process 0] stopped: non-finite values at step" in proc.stderr
    assert "Traceback" not in proc.stderr
