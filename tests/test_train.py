"""The train step: device-count invariance, exact resume, non-finite guard."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib
from clrjax import parallel, train
from clrjax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method="simclr", **overrides):
    """The digits preset shrunk to a few milliseconds per step."""
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + ":digits")
    base = {
        "model.widths": (8, 16, 16, 16), "projector.hidden_dims": (32,), "projector.out_dim": 16,
        "batch_size": 32, "num_steps": 4, "log_every_steps": 2, "checkpoint.every_steps": 2,
        "checkpoint.async_save": False, "eval.final": False,
        # SGD keeps float32 round-off differences proportional; Adam's g/sqrt(v) can amplify them.
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0,
    }
    base.update(overrides)
    return config_lib.apply_overrides(config, base)


def run_steps(config, num_devices, steps):
    """Runs ``steps`` train steps on the first ``num_devices`` devices; returns host params, losses."""
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    state = train.init_train_state(exp)
    step_fn = train.make_train_step(exp)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    losses = []
    for _ in range(steps):
        batch = parallel.host_to_global(train.model_batch(next(loader)), mesh)
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    loader.close()
    return jax.device_get(state), losses


# One step on 8 devices vs 1 and the bit-exact resume of every registered method are in the
# shared method harness (tests/methods/test_harness.py).


def test_three_steps_on_4_devices_track_1_device():
    config = tiny_config("simclr")
    _, loss4 = run_steps(config, 4, 3)
    _, loss1 = run_steps(config, 1, 3)
    np.testing.assert_allclose(loss4, loss1, rtol=1e-4)


def test_finished_run_rerun_reports_and_exits(tmp_path):
    config = tiny_config("simclr", num_steps=2)
    first = train.train(config, str(tmp_path))
    again = train.train(config, str(tmp_path))
    assert first.steps_run == 2 and again.steps_run == 0
    assert int(again.state.step) == 2


def test_resume_with_changed_config_names_the_field(tmp_path):
    train.train(tiny_config("simclr", num_steps=2), str(tmp_path))
    changed = tiny_config("simclr", num_steps=2, **{"loss.temperature": 0.7})
    with pytest.raises(config_lib.ConfigError, match="loss.temperature"):
        train.train(changed, str(tmp_path))
    result = train.train(changed, str(tmp_path), allow_config_change=True)
    assert result.steps_run == 0


def test_nonfinite_update_is_dropped_and_stops(tmp_path):
    config = tiny_config("simclr", num_steps=6, **{"optimizer.lr": 1e30, "optimizer.name": "sgd"})
    with pytest.raises(train.NonFiniteError, match="non-finite values at step"):
        train.train(config, str(tmp_path))


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_state_is_never_applied_or_saved(tmp_path, policy):
    """lr=1e6 with SGD: the loss and gradient stay finite but BatchNorm variances overflow.

    The step must drop that update like a NaN loss, the error must name the
    leaf, and every checkpoint must hold finite values only.
    """
    from clrjax import checkpoint as ckpt_lib

    config = tiny_config("simclr", num_steps=12, **{
        "optimizer.lr": 1e6, "checkpoint.every_steps": 1, "nonfinite.policy": policy,
        "nonfinite.max_consecutive_skips": 2})
    with pytest.raises(train.NonFiniteError, match=r"non-finite state batch_stats\.encoder\.") as err:
        train.train(config, str(tmp_path))
    assert "\n" not in str(err.value)
    checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), every_steps=1, keep=3, async_save=False)
    try:
        steps = checkpointer.all_steps()
        assert steps and f"last good checkpoint is step {max(steps)}" in str(err.value)
        for step in steps:
            for leaf in jax.tree.leaves(checkpointer.restore_subtree(step)):
                assert np.all(np.isfinite(leaf)), f"step {step} holds non-finite values"
    finally:
        checkpointer.close()


def test_nonfinite_skip_policy_keeps_state_finite():
    config = tiny_config("simclr", **{"nonfinite.policy": "skip"})
    mesh = parallel.make_mesh(jax.devices()[:2])
    exp = train.build_experiment(config, mesh)
    state = train.init_train_state(exp)
    before = jax.device_get(state.params)
    step_fn = train.make_train_step(exp)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    batch = train.model_batch(next(loader))
    loader.close()
    # A NaN pixel can't come from uint8 data, so poison the parameters' gradient path instead:
    poisoned = state.replace(params=jax.tree.map(lambda x: x, state.params))
    poisoned = poisoned.replace(params={**poisoned.params, "projector": jax.tree.map(
        lambda x: jnp.full_like(x, jnp.nan), poisoned.params["projector"])})
    new_state, m = step_fn(poisoned, parallel.host_to_global(batch, mesh))
    assert not bool(m["finite"])
    assert int(new_state.step) == 1 and int(new_state.skips) == 1 and int(new_state.total_skips) == 1
    assert int(m["skipped_updates"]) == 1
    # The encoder was not touched by the dropped update.
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state.params["encoder"]),
                 before["encoder"])


def test_checkpoint_write_failure_stops_and_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    import errno
    import orbax.checkpoint as ocp
    from clrjax import checkpoint as ckpt_lib

    original = ocp.CheckpointManager.save

    def disk_full_after_step_2(self, step, *args, **kwargs):
        if step > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full_after_step_2)
    config = tiny_config("simclr", num_steps=6)
    with pytest.raises(ckpt_lib.CheckpointWriteError, match="No space left on device") as err:
        train.train(config, str(tmp_path))
    assert "step 4" in str(err.value) and "re-run" in str(err.value)
    monkeypatch.undo()
    # The earlier checkpoint is intact and the run resumes from it to the end.
    result = train.train(config, str(tmp_path))
    assert result.steps_run == 4 and int(result.state.step) == 6


def test_background_save_failure_surfaces_and_the_run_resumes(tmp_path, monkeypatch):
    """An async save that fails in the background: its error surfaces at the next save (Orbax
    waits for the previous save first), names the step, and the same command resumes."""
    import errno
    import orbax.checkpoint as ocp
    from clrjax import checkpoint as ckpt_lib

    original_save, original_wait = ocp.CheckpointManager.save, ocp.CheckpointManager.wait_until_finished
    started = []

    def save(self, step, *args, **kwargs):
        result = original_save(self, step, *args, **kwargs)
        started.append(step)
        return result

    def wait_reporting_a_failed_write(self):
        original_wait(self)
        if 4 in started:  # the write of step 4 "failed" in the background thread
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    monkeypatch.setattr(ocp.CheckpointManager, "wait_until_finished", wait_reporting_a_failed_write)
    config = tiny_config("simclr", num_steps=6, **{"checkpoint.async_save": True, "checkpoint.every_steps": 2})
    with pytest.raises(ckpt_lib.CheckpointWriteError, match="No space left on device") as err:
        train.train(config, str(tmp_path))
    message = str(err.value)
    assert "step 4 or 6 (the earlier one was still being written in the background)" in message, message
    assert "intact (steps [2])" in message and "re-run the same command" in message
    monkeypatch.undo()
    result = train.train(config, str(tmp_path))  # resumes from an intact checkpoint, finishes
    assert int(result.state.step) == 6 and result.steps_run in (2, 4)


def test_periodic_knn_is_logged(tmp_path):
    from clrjax import metrics as metrics_lib

    config = tiny_config("simclr", num_steps=4, **{"evals.knn.every_steps": 2, "evals.knn.k": (5,)})
    train.train(config, str(tmp_path))
    rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl")) if "knn5_top1" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(0.0 <= r["knn5_top1"] <= 1.0 for r in rows)
    # The step-4 figure is the kNN accuracy of the encoder saved at step 4, recomputed from
    # the checkpoint on one device with the brute-force-tested kNN. Tolerance: one test example
    # (8-device and 1-device features differ by float reassociation, ~1e-6, which may flip a tie).
    from clrjax.evaluation import extract_features, knn_accuracy, restore
    from clrjax.data import pipeline, sources

    encoder = restore.from_workdir(str(tmp_path), step=4)
    features = {split: extract_features(encoder.apply_fn(), pipeline.eval_batches(
        sources.load_digits(split), 100), progress=False, variables=encoder.variables)
        for split in ("train", "test")}
    expected = knn_accuracy(*features["train"], *features["test"], num_classes=10, ks=(5,))
    assert rows[-1]["knn5_top1"] == pytest.approx(expected[5]["top1"], abs=1.5 / len(features["test"][1]))


def test_skip_policy_stops_after_max_consecutive_skips(tmp_path):
    # An absurd learning rate makes the parameters non-finite after the first
    # update, so every later step is dropped until the limit is reached.
    config = tiny_config("simclr", num_steps=12, **{
        "optimizer.lr": 1e30, "nonfinite.policy": "skip", "nonfinite.max_consecutive_skips": 3})
    with pytest.raises(train.NonFiniteError, match="non-finite values at step"):
        train.train(config, str(tmp_path))
    from clrjax import metrics as metrics_lib
    rows = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert rows and rows[-1]["step"] < 12


def test_a_run_from_before_the_method_interface_resumes(tmp_path):
    """Workdirs written before config.evals existed (eval.knn_every_steps instead) still resume:
    the train state's tree is unchanged and evaluation fields do not count as a config change."""
    import json

    config = tiny_config("tico", num_steps=4)
    train.train(config, str(tmp_path), stop_after_steps=2)
    path = tmp_path / "config.json"
    saved = json.loads(path.read_text())
    del saved["evals"]
    saved["eval"]["knn_every_steps"] = 0
    # Fields and sections added since (at their defaults) are not a config change ...
    for section in ("predictor", "momentum", "queue"):
        saved.pop(section, None)
    for field in ("path", "on_error", "split_fraction"):
        saved["dataset"].pop(field, None)
    path.write_text(json.dumps(saved))
    result = train.train(config, str(tmp_path))
    assert result.steps_run == 2 and int(result.state.step) == 4
    # Evaluation reads the old config.json as a current config (new fields at their defaults).
    from clrjax.evaluation import restore
    path.write_text(json.dumps(saved))  # the resumed run rewrote config.json; evaluate the old one
    upgraded = restore.load_run_config(str(tmp_path))
    config_lib.validate_config(upgraded)
    assert upgraded.evals.knn.every_steps == 0 and upgraded.dataset.on_error == "fail"
    assert "knn_every_steps" not in upgraded.eval
    # ... but a field that was absent and now differs from its default is.
    diffs = train.config_differences({"dataset": {"name": "digits"}},
                                     {"dataset": {"name": "digits", "split_fraction": 0.5}})
    assert diffs == ["dataset.split_fraction: '<absent>' -> 0.5"], diffs
