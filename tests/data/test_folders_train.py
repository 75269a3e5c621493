"""Training on your own images end to end: an image folder through clrjax.train.train, kNN/linear
evaluation on its test sub-folder, and the experiments/train.py CLI (class names in config.json,
skipped bad input counted in data_errors.json, a bad image failing with exit 3 and one line)."""
import json
import os
import subprocess
import sys

import numpy as np

from clrjax import config as config_lib, parallel, train
from clrjax.evaluation import run_eval
from tests.data.test_folders import write_folder

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# As tests/test_plugins.py, on 8x8 single-channel images.
TINY = {"model.widths": (8, 16), "model.stem_stride": 1, "projector.hidden_dims": (16,),
        "projector.out_dim": 8, "batch_size": 32, "num_steps": 3, "log_every_steps": 1,
        "checkpoint.every_steps": 100, "checkpoint.async_save": False, "eval.final": False,
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0,
        "dataset.channels": 1, "dataset.image_size": 8, "dataset.decode_workers": 2, "dataset.decode_processes": 0,
        "augment.crop_size": 8, "augment.mean": (0.27,), "augment.std": (0.38,), "eval.knn_k": (5,)}


def _config(root, **overrides):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py:image_folder"))
    return config_lib.apply_overrides(config, dict(TINY, **{"dataset.path": str(root)}, **overrides))


def test_image_folder_trains_and_evaluates_with_knn(tmp_path):
    write_folder(str(tmp_path / "data" / "train"), n_per_class=16)
    write_folder(str(tmp_path / "data" / "test"), n_per_class=8)
    config = _config(tmp_path / "data")
    result = train.train(config, str(tmp_path / "run"))
    assert int(result.state.step) == 3 and np.isfinite(result.final_metrics["loss"])
    assert result.exp.train_source.num_classes == 3 and len(result.exp.train_source) == 48
    mesh = run_eval.eval_mesh()
    encode = run_eval.make_encode_fn(result.exp.model, config.augment.to_dict())
    features = run_eval.split_features(encode, parallel.replicate(run_eval.variables_of(result.state), mesh),
                                       config, mesh)
    assert features.train_x.shape[0] == 48 and features.test_x.shape[0] == 24  # the test sub-folder
    knn = run_eval.knn_result(features, (5,), 0.07)
    assert knn["5"]["top1"] > 0.5   # digits 1/2/3 are separable even by a 3-step encoder's features
