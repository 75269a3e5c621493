r"""Markdown results table of pretraining runs: frozen-encoder accuracy vs random init and raw pixels.

COMMAND:
  python scripts/results_table.py runs/simclr_digits runs/bt_digits runs/vicreg_digits runs/tico_digits \
      [--json=results.json] [--seeds=5] [--shots=10]

For every run directory (one per method per dataset; the latest checkpoint, the run's config.json):
  * linear   -- ``features`` linear probe top-1 (CLIP app. A.3; l2 chosen on a held-out 20%),
  * kNN-20   -- weighted kNN top-1, k = 20, T = 0.07 (Wu et al. 2018),
  * 10-shot  -- 10 examples per class, ``features`` probe, mean ± std over 5 draws,
of the pretrained encoder and of the *same* encoder at its random initialisation (same seed,
``clrjax.train.init_train_state``), next to the linear probe (and kNN-20) on raw pixels
(flattened, /255; the probe standardises them and selects l2 the same way). Raw pixels are
computed once per dataset and skipped above 4,096 values per image (a linear probe on
ImageNet pixels is not a meaningful baseline and would not fit in memory). Runs whose random
initialisations are identical (the same seed and encoder under different methods; compared by a
SHA-256 of the weights) share one evaluation of it.
Training time: ``elapsed_s`` of metrics.jsonl if the trainer logs it, else the sum over logged
intervals of steps x batch / images_per_sec (includes compilation; marked "≈").
Prints the table, the command that produced it, and where each run's config is.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np

RAW_MAX_DIM = 4096


# --------------------------------------------------------------------------- metrics of one encoder


def table_metrics(fs, shots: int, seeds: int) -> Dict[str, float]:
    """linear top-1, kNN-20 top-1 and the ``shots``-shot mean/std of one FeatureSet."""
    from clrjax.evaluation import run_eval

    linear = run_eval.linear_features_result(fs)
    knn = run_eval.knn_result(fs, ks=(20,))
    few = run_eval.few_shot_result(fs, shots=(shots,), seeds=seeds).get(str(shots), {})
    return {"linear_top1": linear["top1"], "knn20_top1": knn["20"]["top1"],
            "few_shot_mean": few.get("mean", float("nan")), "few_shot_std": few.get("std", float("nan"))}


def random_init_encoder(encoder):
    """The run's encoder at initialisation: ``init_train_state`` of its config (same seed)."""
    import jax
    from clrjax import models, parallel, train

    mesh = parallel.make_mesh(jax.local_devices()[:1])  # any batch size divides one device
    state = train.init_train_state(train.build_experiment(encoder.config, mesh=mesh, num_processes=1))
    variables = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    return dataclasses.replace(encoder, variables=models.encoder_variables(variables), step=0)


def variables_digest(variables) -> str:
    """SHA-256 of a variables pytree: every leaf's path, dtype, shape and bytes."""
    import hashlib

    import jax

    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        leaf = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def raw_pixel_features(config):
    """FeatureSet of flattened pixels / 255 of both splits, or None when an image has > RAW_MAX_DIM values."""
    from clrjax.data import pipeline
    from clrjax.evaluation import restore, run_eval

    train_source, test_source = restore.load_splits(config)
    if int(np.prod(train_source.image_shape)) > RAW_MAX_DIM:
        return None

    def pixels(source):
        xs, ys = [], []
        for batch in pipeline.eval_batches(source, 1024):
            mask = batch["mask"]
            xs.append(batch["image"][mask].reshape(int(mask.sum()), -1).astype(np.float32) / 255.0)
            ys.append(batch["label"][mask])
        return np.concatenate(xs), np.concatenate(ys).astype(np.int32)

    train_x, train_y = run_eval.subsample(*pixels(train_source), config.eval.max_train_examples)
    test_x, test_y = pixels(test_source)
    return run_eval.FeatureSet(train_x, train_y, test_x, test_y, int(train_source.num_classes))


# --------------------------------------------------------------------------- training time


def training_seconds(workdir: str, batch_size: int) -> Tuple[Optional[float], bool]:
    """(seconds, estimated): ``elapsed_s`` if logged, else the sum of logged intervals' steps x batch / rate."""
    from clrjax import metrics as metrics_lib

    path = os.path.join(workdir, metrics_lib.METRICS_FILENAME)
    if not os.path.isfile(path):
        return None, False
    rows = [r for r in metrics_lib.read_metrics(path) if "step" in r]
    logged = [r["elapsed_s"] for r in rows if "elapsed_s" in r]
    if logged:
        return float(max(logged)), False
    seconds, previous = 0.0, 0
    for row in rows:
        steps = row["step"] - previous if row["step"] > previous else row["step"]
        previous = row["step"]
        if row.get("images_per_sec"):
            seconds += steps * batch_size / row["images_per_sec"]
    return (seconds if rows else None), True


def format_duration(seconds: Optional[float], estimated: bool) -> str:
    if seconds is None:
        return "n/a"
    text = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min" if seconds < 7200 \
        else f"{seconds / 3600:.1f} h"
    return ("≈" if estimated else "") + text


# --------------------------------------------------------------------------- one run, the table


def method_label(config) -> str:
    """The method's name, with its crops when it trained with multi-crop: 'simclr (2+4 crops)'."""
    num_local = config.augment.get("multicrop", {}).get("num_local", 0)
    return f"{config.method} (2+{num_local} crops)" if num_local else config.method


def evaluate_run_dir(workdir: str, shots: int, seeds: int, cache: dict, progress: bool) -> dict:
    """Every number of one table row; ``cache`` keeps results other rows can share."""
    from clrjax.evaluation import restore, run_eval

    encoder = restore.from_workdir(workdir)
    config = encoder.config
    mesh = run_eval.eval_mesh()
    row = {"workdir": os.path.abspath(workdir), "method": method_label(config), "dataset": config.dataset.name,
           "model": encoder.model_cfg["name"], "step": encoder.step}
    seconds, estimated = training_seconds(workdir, int(config.batch_size))
    row["train_seconds"], row["train_seconds_estimated"] = seconds, estimated
    row["pretrained"] = table_metrics(run_eval.encoder_features(encoder, mesh, progress=progress), shots, seeds)
    random_init = random_init_encoder(encoder)
    # Runs of several methods with one seed and encoder share the random init (projectors
    # differ, the encoder does not): identical weights and data are evaluated once.
    key = json.dumps([variables_digest(random_init.variables), config.dataset.to_dict(), config.augment.to_dict(),
                      config.eval.max_train_examples, shots, seeds], sort_keys=True)
    if key not in cache:
        cache[key] = table_metrics(run_eval.encoder_features(random_init, mesh, progress=progress), shots, seeds)
    row["random_init"] = cache[key]
    key = json.dumps([config.dataset.to_dict(), config.eval.max_train_examples], sort_keys=True)
    if key not in cache:
        raw = raw_pixel_features(config)
        cache[key] = None if raw is None else {
            "linear_top1": run_eval.linear_features_result(raw)["top1"],
            "knn20_top1": run_eval.knn_result(raw, ks=(20,))["20"]["top1"]}
    row["raw_pixels"] = cache[key]
    return row


def _pct(value) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _shot(metrics: dict) -> str:
    if not np.isfinite(metrics["few_shot_mean"]):
        return "n/a"
    return f"{100 * metrics['few_shot_mean']:.1f} ± {100 * metrics['few_shot_std']:.1f}"


def markdown_table(rows: List[dict], shots: int, seeds: int, command: str) -> str:
    """The table, the command that produced it and where each run's config lives."""
    header = ["method", "dataset", "encoder", "steps", "train time",
              "linear", "kNN-20", f"{shots}-shot", "linear (rand. init)", "kNN-20 (rand. init)",
              f"{shots}-shot (rand. init)", "linear (raw pixels)", "kNN-20 (raw pixels)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        pre, rand, raw = r["pretrained"], r["random_init"], r["raw_pixels"] or {}
        cells = [r["method"], r["dataset"], r["model"], str(r["step"]),
                 format_duration(r["train_seconds"], r["train_seconds_estimated"]),
                 _pct(pre["linear_top1"]), _pct(pre["knn20_top1"]), _shot(pre),
                 _pct(rand["linear_top1"]), _pct(rand["knn20_top1"]), _shot(rand),
                 _pct(raw.get("linear_top1")), _pct(raw.get("knn20_top1"))]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        f"Top-1 test accuracy (%). linear: `features` probe (CLIP app. A.3); kNN-20: weighted kNN, T = 0.07 "
        f"(Wu et al. 2018); {shots}-shot: mean ± std over {seeds} draws; rand. init: the same encoder "
        "at initialisation (same seed); raw pixels: the same probes on flattened pixels. "
        "Train time ≈: estimated from metrics.jsonl throughput.",
        "",
        f"Produced by: `{command}`",
        "",
        "Configs: " + ", ".join(f"`{os.path.join(r['workdir'], 'config.json')}`" for r in rows),
    ]
    return "\n".join(lines + notes)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="pretraining run directories")
    parser.add_argument("--shots", type=int, default=10, help="examples per class of the few-shot column")
    parser.add_argument("--seeds", type=int, default=5, help="few-shot draws")
    parser.add_argument("--json", default=None, help="also write every number to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return parser.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from clrjax.evaluation import restore

    # Fail on a bad run directory before evaluating any other.
    for workdir in args.workdirs:
        restore.checkpoint_step(workdir)[0].close()
        restore.load_run_config(workdir)
    command = "python scripts/results_table.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    cache: dict = {}
    rows = [evaluate_run_dir(w, args.shots, args.seeds, cache, not args.no_progress) for w in args.workdirs]
    table = markdown_table(rows, args.shots, args.seeds, command)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": command, "rows": rows}, f, indent=2)
    print(table, flush=True)
    return table


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:  # EvalInputError and config errors: one sentence, no traceback
        print(f"results_table: {err}", file=sys.stderr)
        sys.exit(3)
