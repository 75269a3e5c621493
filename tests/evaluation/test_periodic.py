"""config.evals: every registered evaluator runs from the config during training and is logged."""
import os

import numpy as np
import pytest

from clrjax import config as config_lib, metrics as metrics_lib, train
from clrjax.data import pipeline, sources
from clrjax.evaluation import extract_features, restore, run_eval
from clrjax.evaluation.periodic import EVALUATORS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(**overrides):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py:digits"))
    base = {"model.widths": (8, 16), "projector.hidden_dims": (16,), "projector.out_dim": 8,
            "batch_size": 64, "num_steps": 4, "log_every_steps": 2, "checkpoint.every_steps": 2,
            "checkpoint.keep": 5, "checkpoint.async_save": False, "eval.final": False,
            "optimizer.warmup_epochs": 0.0}
    return config_lib.apply_overrides(config, dict(base, **overrides))


def test_every_evaluator_has_config_fields():
    evals = config_lib.base_config().evals
    assert set(evals) == set(EVALUATORS.names()) == {"knn", "linear", "fewshot", "collapse",
                                                           "zero_shot", "retrieval"}
    for name in EVALUATORS.names():
        assert evals[name].every_steps == 0                       # off unless asked for
        assert set(evals[name]) == {"every_steps", *EVALUATORS.get(name).options}


def test_linear_fewshot_and_collapse_are_logged_at_their_intervals(tmp_path):
    config = _config(**{"evals.linear.every_steps": 2, "evals.fewshot.every_steps": 4,
                        "evals.fewshot.shots": (2,), "evals.fewshot.seeds": 2,
                        "evals.collapse.every_steps": 2})
    train.train(config, str(tmp_path))
    rows = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
    by_step = {r["step"]: r for r in rows}
    assert "linear_top1" in by_step[2] and "linear_top1" in by_step[4]
    assert "fewshot2_top1" not in by_step[2] and "fewshot2_top1" in by_step[4]
    assert "knn20_top1" not in by_step[4]                           # knn is off
    # The logged figures are those of the step-4 checkpoint, recomputed independently on one device.
    encoder = restore.from_workdir(str(tmp_path), step=4)
    feats = {split: extract_features(encoder.apply_fn(), pipeline.eval_batches(sources.load_digits(split), 100),
                                     progress=False, variables=encoder.variables) for split in ("train", "test")}
    fs = run_eval.FeatureSet(*feats["train"], *feats["test"], num_classes=10)
    linear = run_eval.linear_features_result(fs)
    # Tolerance: one test example (8-device and 1-device features differ by float reassociation).
    assert by_step[4]["linear_top1"] == pytest.approx(linear["top1"], abs=1.5 / len(fs.test_y))
    sigma = np.linalg.svd(fs.test_x.astype(np.float64), compute_uv=False)
    p = sigma / sigma.sum() + 1e-7                                  # RankMe, Garrido et al. 2023 eq. 1
    assert by_step[4]["rankme_features"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-3)
    u = fs.test_x / np.linalg.norm(fs.test_x, axis=1, keepdims=True)
    assert by_step[4]["feature_std"] == pytest.approx(np.mean(np.std(u, axis=0)), rel=1e-4)


@pytest.mark.parametrize("field,value,match", [
    ("evals.knn.every_steps", -1, r"config.evals.knn.every_steps is -1 but must be a whole number >= 0"),
])
def test_bad_interval_is_one_sentence(field, value, match):
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate_config(_config(**{field: value}))


def test_unknown_evaluator_is_named():
    bad = _config().to_dict()
    bad["evals"]["probe"] = {"every_steps": 1}
    with pytest.raises(config_lib.ConfigError, match=r"config.evals.probe is not a known field.*knn"):
        config_lib.check_known_keys(bad, config_lib.base_config())
