"""Evaluation protocols on frozen features, and the feature extraction they share.

Everything here works on features and labels (a :class:`FeatureSet`) or on an
encode function and data sources; nothing reads a run directory or a config
file, so both the end-of-run evaluation (:mod:`clrjax.evaluation.run_eval`)
and the periodic evaluators (:mod:`clrjax.evaluation.periodic`) build on it
without depending on each other or on the trainer.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Sequence

import jax
import numpy as np

from clrjax import parallel
from clrjax.data import pipeline
from clrjax.evaluation.features import extract_features
from clrjax.evaluation.fewshot import few_shot
from clrjax.evaluation.knn import knn_accuracy
from clrjax.evaluation.linear import linear_probe_features

KNN_KS = (20, 200)              # Wu et al. 2018 report k = 200; k = 20 is the common small-k setting
KNN_TEMPERATURE = 0.07          # Wu et al. 2018, sec. 3.4
FEW_SHOTS = (1, 5, 10, 25)
FEW_SHOT_SEEDS = 5


# --------------------------------------------------------------------------- features


def eval_mesh():
    """A ``'data'`` mesh over this process's devices (evaluation needs no other host)."""
    return parallel.make_mesh(jax.local_devices())


def eval_batch_size(requested: int, num_devices: int) -> int:
    """The largest multiple of the device count not above ``requested``."""
    return max(num_devices, requested // num_devices * num_devices)


@dataclasses.dataclass
class FeatureSet:
    """Frozen features of both splits: x float32 [N, F], y int32 [N]."""
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int

    def summary(self) -> dict:
        return {"num_train": int(len(self.train_y)), "num_test": int(len(self.test_y)),
                "num_classes": int(self.num_classes), "feature_dim": int(self.train_x.shape[1])}


def subsample(x: np.ndarray, y: np.ndarray, max_examples: int):
    """At most ``max_examples`` rows, a fixed random subset (seed 0); 0 keeps all."""
    if not max_examples or len(y) <= max_examples:
        return x, y
    keep = np.random.default_rng(0).permutation(len(y))[:max_examples]
    return x[keep], y[keep]


def source_features(encode_fn, variables, source, batch_size: int, mesh, progress: bool = False):
    """(features, labels) of every example of ``source``, sharded over ``mesh``."""
    batch = eval_batch_size(batch_size, mesh.size)
    return extract_features(encode_fn, pipeline.eval_batches(source, batch), mesh=mesh, progress=progress,
                            variables=variables)


# --------------------------------------------------------------------------- protocols on features


def linear_features_result(fs: FeatureSet) -> dict:
    """The ``features`` protocol: test top-1/top-5 and the selected l2."""
    probe = linear_probe_features(fs.train_x, fs.train_y, fs.test_x, fs.test_y, num_classes=fs.num_classes)
    return {"top1": float(probe["top1"]), "top5": float(probe["top5"]), "l2": float(probe["l2"]),
            "val_top1": float(probe["val_top1"])}


def knn_result(fs: FeatureSet, ks: Sequence[int] = KNN_KS, temperature: float = KNN_TEMPERATURE) -> dict:
    """``{str(k): {'top1', 'top5'}}`` of the weighted kNN."""
    accs = knn_accuracy(fs.train_x, fs.train_y, fs.test_x, fs.test_y, num_classes=fs.num_classes,
                        ks=tuple(ks), temperature=temperature)
    return {str(k): {"top1": float(a["top1"]), "top5": float(a["top5"])} for k, a in accs.items()}


def few_shot_result(fs: FeatureSet, shots: Sequence[int] = FEW_SHOTS, seeds: int = FEW_SHOT_SEEDS) -> dict:
    """``{str(k): {'mean', 'std', 'per_seed', 'l2'}}``; a k larger than the smallest class is skipped (noted)."""
    smallest = int(np.bincount(fs.train_y, minlength=fs.num_classes).min())
    usable = [k for k in shots if k <= smallest]
    result: Dict[str, Any] = {str(k): v for k, v in few_shot(
        fs.train_x, fs.train_y, fs.test_x, fs.test_y, num_classes=fs.num_classes,
        shots=usable, seeds=seeds).items()} if usable else {}
    skipped = [k for k in shots if k > smallest]
    if skipped:
        result["skipped"] = f"k={skipped}: the smallest class has {smallest} training examples"
    return result




def features_of_splits(encode_fn, variables, splits, eval_cfg, mesh, *, progress: bool = False) -> FeatureSet:
    """Features of the (train, test) ``splits``; train capped at ``eval_cfg.max_train_examples``.

    ``encode_fn(variables, uint8 images) -> features``; ``variables`` replicated over ``mesh``.
    """
    train_source, test_source = splits
    train_x, train_y = source_features(encode_fn, variables, train_source, eval_cfg.batch_size, mesh, progress)
    test_x, test_y = source_features(encode_fn, variables, test_source, eval_cfg.batch_size, mesh, progress)
    train_x, train_y = subsample(train_x, train_y, eval_cfg.max_train_examples)
    return FeatureSet(train_x, train_y, test_x, test_y, int(train_source.num_classes))
