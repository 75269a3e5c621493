"""Evaluation and export programs on a tiny pretraining run.

References are computed independently of clrjax.evaluation.restore/run_eval:
the whole SSLModel is rebuilt from the config, the full checkpointed state is
restored, and features are extracted on one device (no mesh), then fed to the
building blocks (knn_accuracy, linear_probe_features). The programs extract
data-parallel over the 8 simulated devices, from the 'encoder' subtree only.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from clrjax import config as config_lib, models, train
from clrjax.checkpoint import Checkpointer
from clrjax.data import augment, pipeline, sources
from clrjax.evaluation import extract_features, knn_accuracy, linear_probe_features
from clrjax.evaluation import restore, run_eval
from clrjax.export import load_encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.widths": (8, 16, 16, 16), "projector.hidden_dims": (32,), "projector.out_dim": 16,
        "batch_size": 64, "num_steps": 4, "optimizer.warmup_epochs": 0.0, "eval.final": False}


def tiny_config(method="simclr", **overrides):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + ":digits")
    return config_lib.apply_overrides(config, {**TINY, **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "simclr")
    train.train(tiny_config(), workdir)
    return workdir


@pytest.fixture(scope="module")
def reference(run):
    """Features of the checkpoint's SSLModel encoder, one device, built without restore.py."""
    config = tiny_config()
    checkpointer = Checkpointer(os.path.join(run, "checkpoints"), every_steps=1, keep=10)
    state = checkpointer.restore_subtree(checkpointer.latest_step())
    checkpointer.close()
    model = models.build_ssl_model(config.model.to_dict(), config.projector.to_dict(), 10)
    encode = run_eval.make_encode_fn(model, config.augment.to_dict())
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    out = {}
    for split in ("train", "test"):
        source = sources.load_digits(split)
        out[split] = extract_features(encode, pipeline.eval_batches(source, 200), progress=False,
                                      variables=variables)
    return out


def test_partial_restore_reads_the_encoder_entries_alone(run):
    checkpointer = Checkpointer(os.path.join(run, "checkpoints"), every_steps=1, keep=10)
    step = checkpointer.latest_step()
    full = checkpointer.restore_subtree(step)
    partial = checkpointer.restore_subtree(step, keys=restore.ENCODER_STATE_KEYS)
    checkpointer.close()
    assert "opt_state" in full and set(partial) == {"params", "batch_stats"}
    for key in partial:
        flat_full, flat_partial = (jax.tree_util.tree_leaves_with_path(t[key]) for t in (full, partial))
        assert [p for p, _ in flat_full] == [p for p, _ in flat_partial]
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(flat_full, flat_partial))


def test_knn_and_linear_equal_the_building_blocks_on_reference_features(run, reference):
    encoder = restore.from_workdir(run)
    assert encoder.step == 4 and encoder.origin == "workdir"
    (train_x, train_y), (test_x, test_y) = reference["train"], reference["test"]

    fs = run_eval.encoder_features(encoder)  # sharded over 8 devices, encoder subtree only
    np.testing.assert_allclose(fs.train_x, train_x, atol=1e-6)
    np.testing.assert_array_equal(fs.test_y, test_y)

    knn = run_eval.run_knn_eval(encoder)
    expected = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10, ks=(20, 200), temperature=0.07)
    for k in (20, 200):
        assert knn["knn"][str(k)]["top1"] == pytest.approx(expected[k]["top1"], abs=1e-9)
    assert knn["num_train"] == 1438 and knn["num_test"] == 359 and knn["step"] == 4

    linear = run_eval.run_linear_eval(encoder)["features"]
    probe = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=10)
    assert linear["top1"] == pytest.approx(probe["top1"], abs=1 / 359)
    assert linear["top5"] >= linear["top1"] > 0.3  # 10 classes: chance is 0.1


def test_knn_cli_writes_json_and_one_line(run, reference):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "knn_eval.py"), f"--workdir={run}",
                           "--progress=false"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "k=20" in lines[0] and "knn_eval.json" in lines[0]
    assert "Metadata file does not exist" not in proc.stderr  # Orbax noise about a normal layout
    saved = json.load(open(os.path.join(run, run_eval.KNN_EVAL_FILE)))["knn"]
    (train_x, train_y), (test_x, test_y) = reference["train"], reference["test"]
    expected = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10, ks=(20, 200))
    assert saved["knn"]["20"]["top1"] == pytest.approx(expected[20]["top1"], abs=1e-9)
    assert saved["knn"]["200"]["top1"] == pytest.approx(expected[200]["top1"], abs=1e-9)
    assert saved["temperature"] == 0.07 and "knn_eval.py" in saved["command"]


def test_export_loads_to_the_checkpoint_features(run, reference, tmp_path):
    out = str(tmp_path / "export")
    written, notes, _ = restore.export_run(run, out)
    assert set(written) >= {"orbax", "safetensors", "config", "preprocessing"} and "torch" not in written
    assert any("cnn_small" in note for note in notes)  # torch skipped with a note, not an error
    assert json.load(open(os.path.join(out, "preprocessing.json"))) == {"mean": [0.27], "std": [0.38],
                                                                        "image_size": 8}
    images = sources.load_digits("test")[np.arange(40)]["image"]
    x = np.asarray(augment.preprocess_eval(images, tiny_config().augment.to_dict()))
    for path in (out, os.path.join(out, "encoder.safetensors")):
        np.testing.assert_allclose(np.asarray(load_encoder(path)(x)), reference["test"][0][:40], atol=1e-6)

    # Evaluating the export gives the checkpoint's numbers; results go into the export directory.
    from_export = run_eval.run_knn_eval(restore.from_export(out, tiny_config()))
    assert from_export["step"] == 4 and from_export["origin"] == "export"
    assert from_export["knn"] == run_eval.run_knn_eval(restore.from_workdir(run))["knn"]
    # Without --config, the training config the export records (dataset, splits, preprocessing).
    recorded = restore.from_export(out)
    assert recorded.config.to_dict() == restore.from_workdir(run).config.to_dict()
    assert run_eval.run_knn_eval(recorded)["knn"] == from_export["knn"]


def test_export_refuses_to_replace_another_runs_export(run, tmp_path):
    out = str(tmp_path / "export")
    restore.export_run(run, out)
    _, notes, _ = restore.export_run(run, out)  # the same run and step again: idempotent
    assert not [n for n in notes if "replaced" in n]
    other = str(tmp_path / "other_run")  # a copy stands in for another run (no second training)
    shutil.copytree(run, other)
    with pytest.raises(restore.EvalInputError,
                       match=rf"{out} already holds the export of {run} step 4; pass --overwrite to replace it"):
        restore.export_run(other, out, formats=["orbax"])
    assert json.load(open(os.path.join(out, restore.EXPORT_SOURCE_FILE)))["workdir"] == run  # untouched
    _, notes, _ = restore.export_run(other, out, formats=["orbax"], overwrite=True)
    assert any(f"replaced the export of {run} step 4 (--overwrite)" in n for n in notes)
    assert json.load(open(os.path.join(out, restore.EXPORT_SOURCE_FILE)))["workdir"] == other
    assert not os.path.exists(os.path.join(out, "encoder.safetensors"))  # no stale format of the old export
    # A run without a target network cannot export one.
    with pytest.raises(restore.EvalInputError, match="this simclr run keeps no target network"):
        restore.export_run(run, str(tmp_path / "target"), network="target")


def test_export_fails_when_torch_is_asked_for_cnn_small(run, tmp_path):
    with pytest.raises(restore.EvalInputError, match="cnn_small has no torchvision/timm counterpart"):
        restore.export_run(run, str(tmp_path / "e"), formats=["torch"])
    assert not (tmp_path / "e").exists()


def test_augmented_protocol_and_few_shot(run, capsys):
    results = run_eval.run_linear_eval(restore.from_workdir(run), protocol="augmented", epochs=1,
                                       batch_size=128, few_shot_eval=True, shots=(1, 5), seeds=2, progress=True)
    # The probe's line counts steps and their examples (steps x batch), timed only on finished steps.
    progress = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("linear_probe_augmented: step 11/11, 1,408 examples | ") for line in progress)
    first = next(line for line in progress if line.startswith("linear_probe_augmented: step"))
    assert first.startswith("linear_probe_augmented: step 1/11, 128 examples | - img/s")
    aug = results["augmented"]
    assert 0.0 <= aug["top1"] <= aug["top5"] <= 1.0 and np.isfinite(aug["train_loss"])
    assert aug["lr"] == pytest.approx(0.1 * 128 / 256) and aug["steps_per_epoch"] == 1438 // 128
    for k in ("1", "5"):
        shot = results["few_shot"][k]
        assert shot["mean"] == pytest.approx(np.mean(shot["per_seed"])) and len(shot["per_seed"]) == 2
    path = run_eval.write_result(run, run_eval.LINEAR_EVAL_FILE, results)
    line = run_eval.format_linear_line(results, path)
    assert "linear (augmented)" in line and "few-shot 1:" in line


# --------------------------------------------------------------------------- bad inputs


def test_workdir_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config().to_dict()))
    for workdir in (tmp_path, tmp_path / "missing"):
        with pytest.raises(restore.EvalInputError, match=r"no checkpoint in .*checkpoints; train first with"):
            restore.from_flags(str(workdir), None, None, None)
    assert not (tmp_path / "checkpoints").exists()  # the check creates nothing


def test_config_of_another_architecture_names_the_mismatch(run):
    other = tiny_config(**{"model.widths": (32, 64, 128, 128)})
    with pytest.raises(restore.EvalInputError,
                       match=r"params/conv_0/kernel has shape \(3, 3, 1, 8\) .* expects \(3, 3, 1, 32\)"):
        restore.from_workdir(run, other)


def test_missing_split_names_the_valid_splits(run):
    bad = tiny_config(**{"dataset.test_split": "validation"})
    with pytest.raises(restore.EvalInputError, match=r"config.dataset.test_split is 'validation'.*'train' and 'test'"):
        restore.from_workdir(run, bad)


def test_export_dir_checks(run, tmp_path):
    out = tmp_path / "orbax_only"
    restore.export_run(run, str(out), formats=["orbax"])
    os.remove(out / "model_config.json")
    with pytest.raises(restore.EvalInputError, match="has no model_config.json"):
        restore.from_export(str(out), tiny_config())
    with pytest.raises(restore.EvalInputError, match="exactly one of --workdir"):
        restore.from_flags(run, str(out), tiny_config(), None)

    full = tmp_path / "full"
    restore.export_run(run, str(full), formats=["safetensors"])
    with pytest.raises(restore.EvalInputError, match=r"mean=\[0.27\] but config.augment.mean"):
        restore.from_export(str(full), tiny_config(**{"augment.mean": (0.5,)}))
    os.remove(full / restore.EXPORT_SOURCE_FILE)  # e.g. written by export_encoder itself
    with pytest.raises(restore.EvalInputError, match=r"records no training config .*; pass --config=configs/"):
        restore.from_export(str(full), None)


# --------------------------------------------------------------------------- results table


def test_results_table_on_two_runs(run, tmp_path):
    # A copy stands in for a second run: the table logic is what is tested, and a
    # second training would double the cost (scripts/results_table.py was also run by
    # hand on a SimCLR and a VICReg run; docs/EVALUATION.md).
    second = str(tmp_path / "copy")
    shutil.copytree(run, second)
    spec = importlib.util.spec_from_file_location("results_table", os.path.join(ROOT, "scripts", "results_table.py"))
    results_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results_table)
    out_json = str(tmp_path / "table.json")
    table = results_table.main([run, second, "--seeds=2", "--no-progress", f"--json={out_json}"])

    lines = table.splitlines()
    assert lines[0].startswith("| method | dataset") and lines[2].startswith("| simclr | digits")
    assert lines[3].startswith("| simclr | digits") and "Produced by: `python scripts/results_table.py" in table
    rows = json.load(open(out_json))["rows"]
    linear = run_eval.run_linear_eval(restore.from_workdir(run))["features"]
    assert rows[0]["pretrained"]["linear_top1"] == pytest.approx(linear["top1"])
    assert rows[0]["pretrained"] == rows[1]["pretrained"] and rows[0]["random_init"] == rows[1]["random_init"]
    assert rows[0]["random_init"]["linear_top1"] != rows[0]["pretrained"]["linear_top1"]
    assert rows[0]["raw_pixels"]["linear_top1"] > 0.9  # digits pixels are linearly separable
    assert rows[0]["train_seconds"] > 0 and not rows[0]["train_seconds_estimated"]  # logged elapsed_s
    # The second row reused the first row's random-init numbers (same digest): check them afresh.
    random_init = results_table.random_init_encoder(restore.from_workdir(run))
    fresh = run_eval.linear_features_result(run_eval.encoder_features(random_init))
    assert rows[1]["random_init"]["linear_top1"] == pytest.approx(fresh["top1"])
    digest = results_table.variables_digest(random_init.variables)
    changed = jax.tree.map(np.array, random_init.variables)
    first = jax.tree_util.tree_leaves(changed)[0]
    first.flat[0] = np.nextafter(first.flat[0], np.inf)  # one ulp in one weight
    assert results_table.variables_digest(changed) != digest
    assert results_table.variables_digest(jax.tree.map(np.array, random_init.variables)) == digest
