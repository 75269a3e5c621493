"""Frozen-encoder evaluation of a pretraining run, and its end-of-run report.

At the end of ``experiments/train.py`` the encoder (inference-mode BatchNorm,
no projector) is evaluated on the dataset's own splits with the CLIP-style
``features`` linear probe and weighted kNN (Wu et al. 2018), next to the
identical encoder at its random initialisation (same seed): the difference is
what pretraining bought. Results go to ``<workdir>/eval.json``; a re-run of a
finished run prints the saved results instead of recomputing them.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np

from clrjax import metrics as metrics_lib, parallel
from clrjax.data import augment, pipeline, sources
from clrjax.evaluation.features import extract_features
from clrjax.evaluation.knn import knn_accuracy
from clrjax.evaluation.linear import linear_probe_features

EVAL_FILE = "eval.json"


def make_encode_fn(model, variables: Mapping[str, Any], aug_cfg: Mapping[str, Any]):
    """``uint8 images -> features``: eval preprocessing + encoder in inference mode."""
    def encode(images):
        x = augment.preprocess_eval(images, aug_cfg)
        return model.apply(variables, x, train=False, method=model.encode)
    return encode


def split_features(encode_fn, config, split: str, mesh, max_examples: int = 0):
    """(features, labels) of a whole split, extracted data-parallel over ``mesh``."""
    source = sources.load_source(config.dataset.to_dict(), split)
    batch = _eval_batch_size(config.eval.batch_size, mesh.size)
    feats, labels = extract_features(encode_fn, pipeline.eval_batches(source, batch), mesh=mesh,
                                     progress=False)
    if max_examples and len(labels) > max_examples:
        keep = np.random.default_rng(0).permutation(len(labels))[:max_examples]
        feats, labels = feats[keep], labels[keep]
    return feats, labels, source.num_classes


def _eval_batch_size(requested: int, num_devices: int) -> int:
    """The largest multiple of the device count not above ``requested``."""
    return max(num_devices, requested // num_devices * num_devices)


def evaluate_encoder(model, variables, config, mesh) -> dict:
    """Linear probe (top-1/top-5) and kNN accuracies of a frozen encoder."""
    encode = make_encode_fn(model, variables, config.augment.to_dict())
    train_x, train_y, num_classes = split_features(encode, config, config.dataset.train_split, mesh,
                                                   config.eval.max_train_examples)
    test_x, test_y, _ = split_features(encode, config, config.dataset.test_split, mesh)
    linear = linear_probe_features(train_x, train_y, test_x, test_y, num_classes=num_classes)
    knn = knn_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes,
                       ks=tuple(config.eval.knn_k), temperature=config.eval.knn_temperature)
    result = {"linear_top1": float(linear["top1"]), "linear_top5": float(linear["top5"]),
              "linear_l2": float(linear["l2"])}
    for k, acc in knn.items():
        result[f"knn{k}_top1"] = float(acc["top1"])
    return result


def variables_of(state) -> dict:
    """Host copies of the (replicated) encoder variables."""
    return jax.device_get({"params": state.params, "batch_stats": state.batch_stats})


def evaluate_run(result, include_random_init: bool = True) -> dict:
    """Evaluates the trained encoder and (optionally) the same encoder at initialisation.

    Evaluation runs on this process's own devices: in a multi-process run
    every process computes the same numbers without cross-host collectives
    (the splits of the supported evaluation sets fit on one host), and only
    process 0 writes them.
    """
    from clrjax import train  # local: train imports this package's siblings

    exp = result.exp
    local_mesh = parallel.make_mesh(jax.local_devices())
    report = {"pretrained": evaluate_encoder(exp.model, variables_of(result.state), exp.config, local_mesh)}
    if include_random_init:
        initial = train.init_train_state(exp)
        report["random_init"] = evaluate_encoder(exp.model, variables_of(initial), exp.config, local_mesh)
    report["steps"] = int(jax.device_get(result.state.step))
    return report


def format_report(report: dict, workdir: str) -> str:
    keys = [k for k in report["pretrained"] if k.endswith("top1") or k.endswith("top5")]
    rows = [f"{'metric':<14}{'pretrained':>12}{'random init':>13}"]
    for key in keys:
        rand = report.get("random_init", {}).get(key, float("nan"))
        rows.append(f"{key:<14}{report['pretrained'][key]:>12.4f}{rand:>13.4f}")
    rows.append(f"workdir: {os.path.abspath(workdir)}")
    return "\n".join(rows)


def report_and_evaluate(result, workdir: str) -> dict | None:
    """After a finished run: evaluate (once), save eval.json, print the table."""
    config = result.exp.config
    if int(jax.device_get(result.state.step)) < result.exp.total_steps or not config.eval.final:
        return None
    path = os.path.join(workdir, EVAL_FILE)
    if os.path.exists(path):
        with open(path) as f:
            report = json.load(f)
    else:
        report = evaluate_run(result, include_random_init=config.eval.compare_random_init)
        report["final_train_metrics"] = result.final_metrics
        if parallel.is_main_process():
            metrics_lib.MetricWriter(workdir).write_json(EVAL_FILE, report)
    if parallel.is_main_process():
        print(format_report(report, workdir), flush=True)
    return report
