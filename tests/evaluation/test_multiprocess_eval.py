"""Evaluation at pod scale: every process extracts its share of a split, the features are gathered once.

Two local processes x 4 CPU devices (launch/local.py, jax.distributed on localhost) against one
process x 8 devices (this one, tests/conftest.py): the features must be identical and in dataset
order, each process must have read only its share of the examples, and kNN / linear results must
agree to round-off.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from clrjax.data import sources
from clrjax.evaluation import protocols

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "evaluation", "mp_eval_worker.py")
sys.path.insert(0, os.path.dirname(WORKER))
import mp_eval_worker  # noqa: E402


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp_eval")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "launch", "local.py"), "--num_processes=2",
                             "--devices_per_process=4", WORKER, f"--out={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    one = mp_eval_worker.features_and_results()  # overlaps with the subprocesses' start-up
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, f"2-process evaluation failed (exit {proc.returncode}):\n{log[-4000:]}"
    return [dict(np.load(out / f"p{i}.npz")) for i in range(2)], one


def test_two_processes_extract_identical_features_in_dataset_order(two_processes):
    processes, (fs, _, _) = two_processes
    assert [int(p["processes"]) for p in processes] == [2, 2]
    assert [int(p["local_devices"]) for p in processes] == [4, 4]
    for p in processes:  # every process ends with the whole split, as one process would
        np.testing.assert_array_equal(p["train_x"], fs.train_x)
        np.testing.assert_array_equal(p["test_x"], fs.test_x)
        np.testing.assert_array_equal(p["train_y"], fs.train_y)
        np.testing.assert_array_equal(p["test_y"], fs.test_y)
    for split, y in (("train", fs.train_y), ("test", fs.test_y)):
        np.testing.assert_array_equal(y, sources.load_digits(split)[np.arange(len(y))]["label"])


def test_each_process_reads_only_its_share(two_processes):
    processes, (fs, _, one_rows) = two_processes
    sizes = [len(fs.train_y), len(fs.test_y)]
    assert list(one_rows) == sizes  # one process reads everything
    shares = np.array([p["rows"] for p in processes])  # [process, split]
    np.testing.assert_array_equal(shares.sum(axis=0), sizes)
    assert (shares <= np.ceil(np.array(sizes) / 2) + 104).all(), shares  # at most half a padded batch more


def test_two_processes_give_the_one_process_knn_and_linear_results(two_processes):
    processes, (_, one, _) = two_processes
    for p in processes:
        results = json.loads(str(p["results"]))
        for k, acc in one["knn"].items():
            np.testing.assert_allclose(results["knn"][k]["top1"], acc["top1"], atol=1e-6)
            np.testing.assert_allclose(results["knn"][k]["top5"], acc["top5"], atol=1e-6)
        for key in ("top1", "top5", "l2"):
            np.testing.assert_allclose(results["linear"][key], one["linear"][key], rtol=1e-5, atol=1e-6)


def test_two_processes_give_the_one_process_image_text_report(two_processes):
    """Zero-shot and retrieval: each process encodes its share of the images and every text;
    both processes must report the same numbers, and those of one process."""
    processes, _ = two_processes
    reports = [json.loads(str(p["image_text"])) for p in processes]
    assert reports[0] == reports[1]
    one = mp_eval_worker.image_text_report()
    assert set(reports[0]) == set(one) and "zero_shot_top1" in one and "retrieval_t2i_r10" in one
    for key, value in one.items():
        # 4 vs 8 devices per text batch: float32 round-off may move one of the 37 pairs across a tie
        assert abs(reports[0][key] - value) <= 1 / 37 + 1e-9, (key, reports[0][key], value)


def test_rows_return_to_dataset_order_without_padding():
    """The reordering alone, on rows as P=3 processes would hold them (process-major, padded)."""
    n, batch, count = 23, 6, 3
    local = batch // count
    positions, valid = [], []
    for p in range(count):
        for k in range(-(-n // batch)):
            rows = k * batch + p * local + np.arange(local)
            positions.append(np.where(rows < n, rows, 0))
            valid.append(rows < n)
    positions, valid = np.concatenate(positions), np.concatenate(valid)
    features = np.where(valid, positions, -1).astype(np.float32)[:, None] * np.ones((1, 3), np.float32)
    x, y = protocols._in_dataset_order(features, positions.astype(np.int32), positions, valid, n)
    np.testing.assert_array_equal(x[:, 0], np.arange(n))
    np.testing.assert_array_equal(y, np.arange(n))
    with pytest.raises(RuntimeError, match="cover 22 of 23"):
        protocols._in_dataset_order(features, positions, positions, valid & (positions != 7), n)
