"""Frozen-encoder evaluation protocols of a run, and its end-of-training report.

Protocols (each on the dataset's own ``train_split`` -> ``test_split``, the
encoder in inference mode, no projector, eval preprocessing = centre crop +
normalisation, :func:`clrjax.data.augment.preprocess_eval`):

* ``features`` linear probe (CLIP, Radford et al. 2021, app. A.3): L2-regularised
  logistic regression on precomputed standardised features, l2 chosen on a
  held-out 20% of the training split (:func:`clrjax.evaluation.linear.linear_probe_features`);
* ``augmented`` linear probe (SimCLR, Chen et al. 2020, app. B.5; BYOL app. C.1):
  a linear head trained on features of random-resized-crop + flip views with
  SGD + Nesterov momentum 0.9, cosine decay, no weight decay, tested at the centre
  crop (:func:`clrjax.evaluation.linear.linear_probe_augmented`);
* few-shot linear probes, k = 1, 5, 10, 25 examples per class, mean and
  standard deviation over 5 draws (:mod:`clrjax.evaluation.fewshot`);
* weighted kNN, k = 20 and 200, T = 0.07 (Wu et al. 2018, sec. 3.4),
  blockwise (:mod:`clrjax.evaluation.knn`);
* a model with a text tower (CLIP, SigLIP, LiT) also gets zero-shot top-1/top-5
  and image<->text retrieval Recall@1/5/10 on the test split
  (:func:`clrjax.evaluation.zero_shot.image_text_report`).

Feature extraction is data-parallel over this process's devices
(:func:`eval_mesh`). At the end of ``experiments/train.py`` the ``features``
probe and kNN run on the trained encoder and on the identical encoder at its
random initialisation (same seed): the difference is what pretraining bought.
Results go to ``<workdir>/eval.json``; a re-run of a finished run prints the
saved results instead of recomputing them. ``experiments/linear_eval.py`` and
``experiments/knn_eval.py`` write ``linear_eval.json`` / ``knn_eval.json``
(:func:`write_result`).
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Dict, Mapping, Optional, Sequence

import jax
import numpy as np

from clrjax import metrics as metrics_lib, parallel, storage
from clrjax.data import augment, pipeline
from clrjax.evaluation.features import extract_features
from clrjax.evaluation.protocols import (  # noqa: F401  (re-exported: the protocols of a run)
    FEW_SHOT_SEEDS, FEW_SHOTS, KNN_KS, KNN_TEMPERATURE, FeatureSet, eval_batch_size, eval_mesh,
    features_of_splits, few_shot_result, knn_result, linear_features_result, source_features, subsample)
from clrjax.evaluation.knn import knn_accuracy
from clrjax.evaluation.linear import linear_probe_augmented, linear_probe_features
from clrjax.evaluation.restore import EvalInputError, FrozenEncoder, load_splits

EVAL_FILE = "eval.json"
LINEAR_EVAL_FILE = "linear_eval.json"
KNN_EVAL_FILE = "knn_eval.json"
PROTOCOLS = ("features", "augmented")
AUGMENTED_EPOCHS = 90           # SimCLR app. B.5: 90 epochs
AUGMENTED_BATCH = 256
AUGMENTED_BASE_LR = 0.1         # SimCLR app. B.5: lr = 0.1 x batch / 256


# --------------------------------------------------------------------------- features


def split_features(encode_fn, variables, config, mesh, *, splits=None, progress: bool = False) -> FeatureSet:
    """:func:`~clrjax.evaluation.protocols.features_of_splits` of ``config.dataset``'s train and test splits."""
    return features_of_splits(encode_fn, variables, splits or load_splits(config), config.eval, mesh,
                              progress=progress)


def encoder_features(encoder: FrozenEncoder, mesh=None, *, splits=None, progress: bool = False) -> FeatureSet:
    """:func:`split_features` of a restored encoder, its variables replicated over ``mesh``."""
    mesh = mesh or eval_mesh()
    variables = parallel.replicate(encoder.variables, mesh)
    return split_features(encoder.apply_fn(), variables, encoder.config, mesh, splits=splits, progress=progress)


# --------------------------------------------------------------------------- the augmented protocol


def crop_flip_config(aug_cfg: Mapping[str, Any]) -> dict:
    """The training augmentation reduced to random-resized-crop + flip (SimCLR app. B.5)."""
    return dict(aug_cfg, jitter_prob=0.0, gray_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))


def check_augmented_batch(batch_size: int, num_devices: int, num_train: int) -> None:
    if batch_size <= 0 or batch_size % num_devices:
        raise EvalInputError(f"--batch_size={batch_size} must be a positive multiple of the {num_devices} "
                             f"local devices; use e.g. {num_devices * max(1, batch_size // num_devices)}.")
    if batch_size > num_train:
        raise EvalInputError(f"--batch_size={batch_size} exceeds the {num_train} training examples; "
                             f"use at most {num_train // num_devices * num_devices}.")


def augmented_linear_result(encoder: FrozenEncoder, mesh=None, *, epochs: int = AUGMENTED_EPOCHS,
                            lr: Optional[float] = None, batch_size: int = AUGMENTED_BATCH,
                            splits=None, progress: bool = False) -> dict:
    """The ``augmented`` protocol; ``lr`` defaults to 0.1 x batch_size / 256 (SimCLR app. B.5).

    Epoch ``e`` visits the training split in the order of
    :func:`clrjax.data.pipeline.epoch_permutation` (seed ``config.seed``),
    dropping the remainder; example keys fold in the global example counter
    and the epoch, so the result does not depend on the device count.
    """
    mesh = mesh or eval_mesh()
    config = encoder.config
    train_source, test_source = splits or load_splits(config)
    check_augmented_batch(batch_size, mesh.size, len(train_source))
    if epochs <= 0:
        raise EvalInputError(f"--epochs={epochs} must be positive.")
    lr = AUGMENTED_BASE_LR * batch_size / 256 if lr is None else float(lr)
    if not lr > 0:
        raise EvalInputError(f"--lr={lr} must be positive.")
    loader = pipeline.TrainLoader(train_source, batch_size, int(config.seed), prefetch=0)
    steps_per_epoch = loader.steps_per_epoch

    def train_batches(epoch):
        return (loader.batch_at(epoch * steps_per_epoch + t) for t in range(steps_per_epoch))

    aug_cfg = config.augment.to_dict()
    train_aug = crop_flip_config(aug_cfg)
    variables = parallel.replicate(encoder.variables, mesh)
    probe = linear_probe_augmented(
        encoder.apply_fn(preprocess=False), train_batches,
        pipeline.eval_batches(test_source, eval_batch_size(config.eval.batch_size, mesh.size)),
        num_classes=int(train_source.num_classes), epochs=int(epochs), lr=lr,
        augment_fn=lambda images, index, key: augment.augment_batch(images, index, key, train_aug, 0),
        test_preprocess_fn=lambda images: augment.preprocess_eval(images, aug_cfg),
        seed=int(config.seed), mesh=mesh, steps_per_epoch=steps_per_epoch, progress=progress,
        variables=variables)
    loader.close()
    return {"top1": float(probe["top1"]), "top5": float(probe["top5"]),
            "train_loss": float(probe["train_loss"]), "epochs": int(epochs), "lr": lr,
            "batch_size": int(batch_size), "steps_per_epoch": int(steps_per_epoch)}


# --------------------------------------------------------------------------- programs


def provenance(encoder: FrozenEncoder) -> dict:
    """What was evaluated, on what: stored with every result."""
    ds = encoder.config.dataset
    return {"origin": encoder.origin, "path": encoder.path, "step": encoder.step, "network": encoder.network,
            "model": encoder.model_cfg, "dataset": ds.name, "train_split": ds.train_split,
            "test_split": ds.test_split, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def run_linear_eval(encoder: FrozenEncoder, *, protocol: str = "features", few_shot_eval: bool = False,
                    epochs: int = AUGMENTED_EPOCHS, lr: Optional[float] = None,
                    batch_size: int = AUGMENTED_BATCH, shots: Sequence[int] = FEW_SHOTS,
                    seeds: int = FEW_SHOT_SEEDS, mesh=None, progress: bool = False) -> dict:
    """``{protocol: {...}, 'few_shot': {...}?}``, each entry with :func:`provenance`."""
    if protocol not in PROTOCOLS:
        raise EvalInputError(f"--protocol={protocol!r} is unknown; use one of {', '.join(PROTOCOLS)}.")
    mesh = mesh or eval_mesh()
    splits = load_splits(encoder.config)
    info = provenance(encoder)
    results: Dict[str, Any] = {}
    fs = None
    if protocol == "features" or few_shot_eval:
        fs = encoder_features(encoder, mesh, splits=splits, progress=progress)
        info = dict(info, **fs.summary())
    if protocol == "features":
        results["features"] = dict(linear_features_result(fs), **info)
    else:
        results["augmented"] = dict(augmented_linear_result(
            encoder, mesh, epochs=epochs, lr=lr, batch_size=batch_size, splits=splits, progress=progress), **info)
    if few_shot_eval:
        results["few_shot"] = dict(few_shot_result(fs, shots, seeds), seeds=int(seeds), **info)
    return results


def run_knn_eval(encoder: FrozenEncoder, *, ks: Sequence[int] = KNN_KS, temperature: float = KNN_TEMPERATURE,
                 mesh=None, progress: bool = False) -> dict:
    """``{'knn': {str(k): {'top1', 'top5'}}, 'temperature': T, ...provenance}``."""
    if not ks or any(int(k) < 1 for k in ks):
        raise EvalInputError(f"--ks={list(ks)} must list positive integers, e.g. 20,200.")
    if not temperature > 0:
        raise EvalInputError(f"--temperature={temperature} must be positive (Wu et al. 2018 use 0.07).")
    fs = encoder_features(encoder, mesh, progress=progress)
    return dict(knn=knn_result(fs, ks, temperature), temperature=float(temperature),
                **provenance(encoder), **fs.summary())


def write_result(out_dir: str, filename: str, entries: Mapping[str, Any]) -> str:
    """Merges ``entries`` into ``out_dir/filename`` atomically, keeping other protocols' entries; returns the path."""
    path = storage.join(out_dir, filename)
    merged = {}
    if storage.isfile(path):
        merged = json.loads(storage.read_text(path))
    merged.update(entries)
    if parallel.is_main_process():
        storage.makedirs(out_dir)
        metrics_lib.write_json_file(path, merged)
    return path


def format_linear_line(results: Mapping[str, Any], path: str) -> str:
    """One console line: protocol top-1/top-5, few-shot means, what was evaluated, where it went."""
    parts = []
    for protocol in PROTOCOLS:
        if protocol in results:
            r = results[protocol]
            parts.append(f"linear ({protocol}) top-1 {r['top1']:.4f} top-5 {r['top5']:.4f}")
    if "few_shot" in results:
        shots = [f"{k}: {v['mean']:.4f}±{v['std']:.4f}" for k, v in results["few_shot"].items()
                 if isinstance(v, dict) and "mean" in v]
        parts.append("few-shot " + ", ".join(shots))
    first = next(iter(results.values()))
    return f"{' | '.join(parts)} | {_what(first)} -> {path}"


def format_knn_line(result: Mapping[str, Any], path: str) -> str:
    accs = ", ".join(f"k={k} top-1 {v['top1']:.4f}" for k, v in result["knn"].items())
    return f"kNN (T={result['temperature']:g}) {accs} | {_what(result)} -> {path}"


def _what(info: Mapping[str, Any]) -> str:
    step = f" step {info['step']}" if info.get("step") is not None else ""
    network = " (target network)" if info.get("network", "online") != "online" else ""
    return f"{info['origin']} {info['path']}{step}{network}, {info['dataset']} {info['test_split']}"


# --------------------------------------------------------------------------- end of training


def make_encode_fn(model, aug_cfg: Mapping[str, Any]):
    """``(variables, uint8 images) -> features`` of an SSLModel: eval preprocessing + encoder in inference mode."""
    def encode(variables, images):
        x = augment.preprocess_eval(images, aug_cfg)
        return model.apply(variables, x, train=False, method=model.encode)
    return encode


def evaluate_encoder(model, variables, config, mesh) -> dict:
    """``features`` linear probe (top-1/top-5) and kNN (``config.eval.knn_k``) of an SSLModel's encoder."""
    encode = make_encode_fn(model, config.augment.to_dict())
    fs = split_features(encode, parallel.replicate(variables, mesh), config, mesh)
    linear = linear_features_result(fs)
    knn = knn_result(fs, tuple(config.eval.knn_k), config.eval.knn_temperature)
    result = {"linear_top1": linear["top1"], "linear_top5": linear["top5"], "linear_l2": linear["l2"]}
    for k, acc in knn.items():
        result[f"knn{k}_top1"] = acc["top1"]
    if hasattr(model, "encode_text"):  # a text tower: zero-shot and retrieval on the test split
        from clrjax.evaluation import zero_shot
        result.update(zero_shot.image_text_report(model, parallel.replicate(variables, mesh), config, mesh))
    return result


def variables_of(state) -> dict:
    """Host copies of the encoder variables; a leaf sharded over several processes (FSDP) is
    gathered, so every process calls this (clrjax/state_sharding.py ``host_copy``)."""
    from clrjax import state_sharding  # local: the evaluation programs never shard anything
    return state_sharding.host_copy({"params": state.params, "batch_stats": state.batch_stats})


def evaluate_run(result, include_random_init: bool = True) -> dict:
    """Evaluates the trained encoder and (optionally) the same encoder at initialisation.

    Every process of a multi-process run calls it: each encodes its share of
    the splits on its own devices, the features are all-gathered once
    (:func:`clrjax.evaluation.protocols.source_features`), every process then
    computes the same numbers from them, and only process 0 writes them.
    """
    exp = result.exp
    local_mesh = eval_mesh()
    report = {"pretrained": evaluate_encoder(exp.model, variables_of(result.state), exp.config, local_mesh)}
    if include_random_init:
        initial = result.initial_state()
        report["random_init"] = evaluate_encoder(exp.model, variables_of(initial), exp.config, local_mesh)
    report["steps"] = int(jax.device_get(result.state.step))
    return report


def format_report(report: dict, workdir: str) -> str:
    keys = [k for k in report["pretrained"]
            if k.endswith("top1") or k.endswith("top5") or k.startswith("retrieval_")]
    rows = [f"{'metric':<18}{'pretrained':>12}{'random init':>13}"]
    for key in keys:
        rand = report.get("random_init", {}).get(key, float("nan"))
        rows.append(f"{key:<18}{report['pretrained'][key]:>12.4f}{rand:>13.4f}")
    rows.append(f"workdir: {storage.absolute(workdir)}")
    return "\n".join(rows)


def report_and_evaluate(result, workdir: str) -> dict | None:
    """After a finished run: evaluate (once), save eval.json, print the table."""
    config = result.exp.config
    if int(jax.device_get(result.state.step)) < result.exp.total_steps or not config.eval.final:
        return None
    path = storage.join(workdir, EVAL_FILE)
    if storage.exists(path):
        report = json.loads(storage.read_text(path))
    else:
        report = evaluate_run(result, include_random_init=config.eval.compare_random_init)
        report["final_train_metrics"] = result.final_metrics
        if parallel.is_main_process():
            metrics_lib.write_json_file(path, report)
    if parallel.is_main_process():
        print(format_report(report, workdir), flush=True)
    return report
