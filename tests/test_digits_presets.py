"""Each method's digits preset beats its random-init encoder on linear and kNN-20 (slow: ~1-2 min per method).

Run with `pytest -m slow tests/test_digits_presets.py`. The default suite covers
the same code paths in miniature (tests/test_train.py, tests/test_cli.py); this
test pins the accuracy claim the README makes.
"""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import digits_presets  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("method", digits_presets.METHODS)
def test_digits_preset_beats_random_init(method, tmp_path, monkeypatch):
    # Full optimisation (not tests/xla_env.py's level 0): 300 real training steps, where execution,
    # not compilation, is the cost.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    report = digits_presets.run_method(method, str(tmp_path))
    for metric in ("linear_top1", "knn20_top1"):  # README "Results": linear and kNN-20 beat random init
        assert report["pretrained"][metric] > report["random_init"][metric], metric
