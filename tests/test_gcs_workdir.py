"""A run whose workdir is on Google Cloud Storage (``--workdir=gs://bucket/run``), end to end.

Against a local fake GCS (tests/gcs_fake.py: gcp-storage-emulator, spoken to by gcsfs and by
TensorStore's ``gcs`` driver, which Orbax writes the arrays with): a tiny digits run trains, is
stopped, resumes from the GCS checkpoint and ends with exactly the parameters of an
uninterrupted local run; metrics, config, curves and TensorBoard events are on GCS; the export
and the evaluations (in-process and the knn_eval program) read the checkpoint from GCS and
write their results there; and nothing named ``gs:`` appears on the local disk.
"""
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from clrjax import config as config_lib, export as export_lib, metrics as metrics_lib, storage, train
from clrjax.checkpoint import Checkpointer
from clrjax.evaluation import restore, run_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gcs_fake import FakeGcs  # noqa: E402

RUN = "gs://bucket/run"
TINY = {"model.widths": (8, 16, 16, 16), "projector.hidden_dims": (32,), "projector.out_dim": 16,
        "batch_size": 64, "num_steps": 4, "log_every_steps": 2, "checkpoint.every_steps": 2,
        "optimizer.warmup_epochs": 0.0, "eval.final": False}


def tiny_config():
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":digits")
    return config_lib.apply_overrides(config, TINY)


@pytest.fixture(scope="module")
def gcs():
    pytest.importorskip("gcsfs", reason="the gcs extra (pip install -e '.[gcs]') is not installed")
    pytest.importorskip("gcp_storage_emulator", reason="the test extra's gcp-storage-emulator is not installed")
    try:
        server = FakeGcs().__enter__()
    except RuntimeError as err:
        pytest.skip(f"the fake GCS server could not start: {err}")
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    # gcsfs asks Google for the bucket's type (zonal or not) and warns when it cannot.
    logging.getLogger("gcsfs").setLevel(logging.ERROR)
    yield server
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def restore_state(directory, step):
    checkpointer = Checkpointer(directory, every_steps=1, keep=10)
    try:
        return checkpointer.restore_subtree(step)
    finally:
        checkpointer.close()


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
    """(stopped invocation, resumed invocation, uninterrupted local workdir, knn_eval program output)."""
    cwd = tmp_path_factory.mktemp("cwd")
    old = os.getcwd()
    os.chdir(cwd)  # a gs:// path mistaken for a local one would appear here as gs:/bucket/run
    try:
        stopped = train.train(tiny_config(), RUN, stop_after_steps=2)
        resumed = train.train(tiny_config(), RUN)
        program = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "experiments", "knn_eval.py"), f"--workdir={RUN}", "--ks=5",
             "--noprogress"], cwd=cwd, env=dict(os.environ, JAX_PLATFORMS="cpu"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        local = str(tmp_path_factory.mktemp("local") / "run")
        train.train(tiny_config(), local)  # the uninterrupted reference, while the program runs
        output = program.communicate(timeout=300)[0]
        assert program.returncode == 0, output[-3000:]
    finally:
        os.chdir(old)
    return stopped, resumed, local, output, cwd


def test_a_stopped_run_resumes_from_gcs_bit_exactly(runs):
    stopped, resumed, local, _, _ = runs
    assert stopped.steps_run == 2 and resumed.steps_run == 2
    on_gcs, reference = restore_state(f"{RUN}/checkpoints", 4), restore_state(os.path.join(local, "checkpoints"), 4)
    flat, got = (jax.tree_util.tree_leaves_with_path(t) for t in (reference, on_gcs))
    assert [p for p, _ in flat] == [p for p, _ in got] and len(flat) > 10
    for (path, value), (_, restored) in zip(flat, got):
        np.testing.assert_array_equal(restored, value, err_msg=jax.tree_util.keystr(path))


def test_metrics_config_curves_and_events_are_on_gcs(runs):
    _, _, local, _, _ = runs
    names = set(storage.listdir(RUN))
    assert {"config.json", "metrics.jsonl", "curves.png", "tensorboard", "checkpoints"} <= names
    rows = metrics_lib.read_metrics(f"{RUN}/metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4]  # the stopped invocation's rows kept, none twice
    local_rows = metrics_lib.read_metrics(os.path.join(local, "metrics.jsonl"))
    assert [r["loss"] for r in rows] == [r["loss"] for r in local_rows]
    assert json.loads(storage.read_text(f"{RUN}/config.json"))["num_steps"] == 4
    assert storage.read_bytes(f"{RUN}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    events = storage.listdir(f"{RUN}/tensorboard")
    assert len(events) == 2  # one event file per invocation, each uploaded whole
    from tensorboard.backend.event_processing import event_file_loader
    steps = set()
    for name in events:
        path = os.path.join(local, f"downloaded-{name}")
        with open(path, "wb") as f:
            f.write(storage.read_bytes(f"{RUN}/tensorboard/{name}"))
        steps |= {e.step for e in event_file_loader.EventFileLoader(path).Load() if e.summary.value}
    assert steps == {2, 4}


def test_export_and_evaluation_read_the_checkpoint_from_gcs(runs):
    _, _, local, output, _ = runs
    written, _, encoder = restore.export_run(RUN)
    assert written["safetensors"] == f"{RUN}/export/encoder.safetensors" and encoder.step == 4
    loaded = export_lib.load_encoder(f"{RUN}/export")
    state = restore_state(f"{RUN}/checkpoints", 4)
    exported, saved_encoder = (jax.tree.leaves(t) for t in (loaded.variables["params"], state["params"]["encoder"]))
    assert len(exported) == len(saved_encoder) > 0
    for a, b in zip(exported, saved_encoder):
        np.testing.assert_array_equal(np.asarray(a), b)
    from_gcs = run_eval.run_knn_eval(restore.from_export(f"{RUN}/export"), ks=(5,))
    from_local = run_eval.run_knn_eval(restore.from_workdir(local), ks=(5,))
    assert from_gcs["knn"] == from_local["knn"]
    # The knn_eval program wrote its result next to the run, on GCS.
    saved = json.loads(storage.read_text(f"{RUN}/knn_eval.json"))["knn"]
    assert saved["knn"] == from_local["knn"] and saved["path"] == RUN, output[-2000:]


def test_nothing_named_gs_is_created_locally(runs):
    *_, cwd = runs
    for directory in (cwd, ROOT, os.path.join(ROOT, "tests")):
        assert not os.path.exists(os.path.join(directory, "gs:")), directory


def test_gcs_paths(gcs):
    assert storage.absolute("gs://bucket//run/") == "gs://bucket/run"
    assert storage.join("gs://bucket/run", "checkpoints") == "gs://bucket/run/checkpoints"
    assert storage.dirname("gs://bucket/run/export") == "gs://bucket/run"
    assert storage.is_within("gs://bucket/run/x.json", "gs://bucket/run")
    assert not storage.is_within("gs://bucket/run2/x.json", "gs://bucket/run")
    with pytest.raises(ValueError, match="cannot append"):
        storage.open("gs://bucket/x.txt", "a")
