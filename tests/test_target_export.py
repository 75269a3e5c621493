"""A tiny BYOL run, interrupted and resumed: one metrics row per step, and its target encoder exported.

One run serves both checks (training is the expensive part): it is stopped after step 3 with
checkpoints at 2 and 3, checkpoint 3 is removed (as if the process had died while writing it), and
the re-run resumes from step 2, replaying step 3 and going on to 4. The export of the target
network is compared with the target encoder applied directly to the checkpoint's method state.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from clrjax import config as config_lib, metrics, models, optim, parallel, train
from clrjax.checkpoint import Checkpointer
from clrjax.evaluation import restore
from clrjax.export import load_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.widths": (8, 16), "projector.hidden_dims": (16,), "projector.out_dim": 8,
        "predictor.hidden_dims": (16,), "batch_size": 32, "num_steps": 4, "log_every_steps": 1,
        "checkpoint.every_steps": 2, "checkpoint.async_save": False, "optimizer.warmup_epochs": 0.0,
        "eval.final": False,
        # Smaller programs to compile (what this test pays for): no colour jitter, plain SGD.
        "augment.jitter_prob": 0.0, "optimizer.name": "sgd", "optimizer.lr": 0.05}


def tiny_byol():
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "byol.py") + ":digits")
    return config_lib.apply_overrides(config, TINY)


@pytest.fixture(scope="module")
def byol_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("byol") / "run")
    mesh = parallel.make_mesh(jax.devices()[:1])  # one device: the cheapest compile
    train.train(tiny_byol(), workdir, mesh=mesh, stop_after_steps=3)
    path = os.path.join(workdir, metrics.METRICS_FILENAME)
    first = metrics.read_metrics(path)
    # Killed while checkpoint 3 was being written: its rows are logged (marked here, to tell
    # them from the resumed run's), its checkpoint is not, and the kill tore a line.
    shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
    with open(path, "w") as f:
        f.writelines(json.dumps(dict(row, interrupted=1) if row["step"] == 3 else row) + "\n" for row in first)
        f.write('{"step": 3, "lo')
    train.train(tiny_byol(), workdir, mesh=mesh)
    return workdir, first


def test_resumed_run_keeps_one_metrics_row_per_step(byol_run):
    workdir, first = byol_run
    assert [row["step"] for row in first] == [1, 2, 3]
    rows = metrics.read_metrics(os.path.join(workdir, metrics.METRICS_FILENAME))
    assert [row["step"] for row in rows] == [1, 2, 3, 4]  # 5 rows without the truncation
    assert rows[:2] == first[:2]  # rows up to the checkpoint are kept as written
    assert "interrupted" not in rows[2]  # step 3 is the row of the run that continued
    assert rows[2]["loss"] == pytest.approx(first[2]["loss"], rel=1e-6)  # (exact resume: same values)


def _encoder_of(tree):
    return models.encoder_variables({k: v for k, v in tree.items() if v})


def test_export_of_the_target_network(byol_run, tmp_path):
    workdir, _ = byol_run
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    state = checkpointer.restore_subtree(4)
    checkpointer.close()
    target = _encoder_of(state["method_state"]["target"])
    online = _encoder_of({"params": state["params"], "batch_stats": state["batch_stats"]})
    module = models.build_encoder(tiny_byol().model.to_dict())
    x = np.random.default_rng(0).standard_normal((4, 8, 8, 1)).astype(np.float32)
    apply = jax.jit(lambda v, x: module.apply(v, x, train=False))

    out = str(tmp_path / "target")
    _, notes, encoder = restore.export_run(workdir, out, network="target")
    assert encoder.network == "target" and encoder.step == 4
    source = json.load(open(os.path.join(out, restore.EXPORT_SOURCE_FILE)))
    assert source["network"] == "target" and source["config"]["method"] == "byol"
    got = np.asarray(load_encoder(out)(x))
    np.testing.assert_allclose(got, np.asarray(apply(target, x)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, np.asarray(apply(online, x)), rtol=1e-3, atol=1e-3)

    # The default stays the online encoder; it may not silently replace the target export.
    with pytest.raises(restore.EvalInputError, match=r"already holds the export of .* step 4 \(target network\)"):
        restore.export_run(workdir, out)
    evaluated = restore.from_export(out)  # no --config: the recorded one
    assert evaluated.network == "target" and evaluated.config.method == "byol"


def test_warmup_longer_than_the_run_names_the_field_and_a_value():
    cfg = dict(tiny_byol().optimizer.to_dict(), warmup_epochs=10.0)
    with pytest.raises(ValueError, match=r"pass --opt_cfg.warmup_epochs=0.5 or less \(0: no warmup\), or train "
                                         r"longer \(--config.num_steps"):
        optim.build_optimizer(cfg, global_batch=32, total_steps=22, steps_per_epoch=44)
