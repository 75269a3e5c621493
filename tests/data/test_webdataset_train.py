"""Training from tar shards end to end: clrjax.train.train streams digit shards (decoded in worker
processes), kNN on the test shards, and a skipped bad shard counted in metrics.jsonl and data_errors.json."""
import json
import os

import numpy as np

from clrjax import config as config_lib, parallel, train
from clrjax.data import folders
from clrjax.evaluation import run_eval
from tests.data.test_folders_train import ROOT, TINY
from tests.data.test_webdataset import digits, write_shards


def test_webdataset_trains_evaluates_with_knn_and_counts_skipped_input(tmp_path):
    images, labels = digits(per_class=24)
    data = str(tmp_path / "data")
    write_shards(data, images[:54], labels[:54], (20, 18, 16), prefix="train")
    write_shards(data, images[54:], labels[54:], (18,), prefix="test")
    last = os.path.join(data, "train-002.tar")
    with open(last, "r+b") as f:  # cut short: its end-of-archive blocks are gone
        f.truncate(os.path.getsize(last) - 10240)
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py:webdataset"))
    config = config_lib.apply_overrides(config, dict(TINY, **{
        "dataset.path": os.path.join(data, "{split}-*.tar"), "dataset.on_error": "skip",
        "dataset.decode_processes": 2, "dataset.shuffle_buffer": 16, "batch_size": 16, "num_steps": 4}))
    workdir = str(tmp_path / "run")
    result = train.train(config, workdir)  # (exact resume: tests/data/test_webdataset.py, the loader)
    assert int(result.state.step) == 4 and np.isfinite(result.final_metrics["loss"])
    source = result.exp.train_source
    assert source.errors.by_kind == {"truncated": 1} and source.shard_sizes.tolist()[:2] == [20, 18]
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["data_skipped"] for r in rows] == [1, 1, 1, 1] and result.final_metrics["data_skipped"] == 1
    report = folders.write_error_report(source, workdir)
    assert json.load(open(report))["by_kind"] == {"truncated": 1}
    mesh = run_eval.eval_mesh()
    encode = run_eval.make_encode_fn(result.exp.model, config.augment.to_dict())
    features = run_eval.split_features(encode, parallel.replicate(run_eval.variables_of(result.state), mesh),
                                       config, mesh)
    assert features.train_x.shape[0] == len(source) and features.test_x.shape[0] == 18
    knn = run_eval.knn_result(features, (5,), 0.07)
    assert knn["5"]["top1"] > 0.5   # digits 1/2/3 are separable even by a 4-step encoder's features
    source.close()
