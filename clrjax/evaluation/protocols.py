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


# Rows of features one all-gather moves per process: bounds the device memory the gather needs
# (ImageNet's 1.28 M x 2048 float32 training features are 10 GB).
GATHER_BYTES = 64 << 20


def source_features(encode_fn, variables, source, batch_size: int, mesh, progress: bool = False):
    """(features, labels) of every example of ``source`` in dataset order, sharded over ``mesh``.

    In a multi-process run whose ``mesh`` holds this process's devices, each
    process encodes only its rows of every global batch
    (:func:`clrjax.data.pipeline.eval_batches`: process ``p`` of ``P`` takes
    rows ``[p*B/P, (p+1)*B/P)``, the last batch padded), and the features are
    then all-gathered once and put back in dataset order, so every process
    returns what one process would. The global batch is a multiple of all the
    processes' devices, and device ``d`` of process ``p`` encodes the rows
    that device ``p*L + d`` of a one-process run over the same ``P*L``
    devices would: the same per-device program on the same rows.
    """
    count = jax.process_count()
    if count == 1 or not _is_local(mesh):
        batch = eval_batch_size(batch_size, mesh.size)
        return extract_features(encode_fn, pipeline.eval_batches(source, batch), mesh=mesh, progress=progress,
                                variables=variables)
    batch = eval_batch_size(batch_size, mesh.size * count)
    positions, valid = [], []

    def share():
        """This process's rows, padding kept (every process then holds the same number of rows)."""
        for rows in pipeline.eval_batches(source, batch, jax.process_index(), count):
            positions.append(rows["index"])
            valid.append(rows["mask"])
            yield dict(rows, mask=np.ones_like(rows["mask"]))

    features, labels = extract_features(encode_fn, share(), mesh=mesh, progress=progress, variables=variables)
    return _in_dataset_order(_gather_rows(features), _gather_rows(labels),
                             _gather_rows(np.concatenate(positions)), _gather_rows(np.concatenate(valid)), len(source))


def _is_local(mesh) -> bool:
    return all(device.process_index == jax.process_index() for device in np.ravel(mesh.devices))


def _gather_rows(local: np.ndarray) -> np.ndarray:
    """The processes' equally long ``local`` arrays concatenated in process order, in chunks of
    about :data:`GATHER_BYTES` per process (the same chunks on every process)."""
    from jax.experimental import multihost_utils

    row_bytes = max(1, local[:1].nbytes)
    step = max(1, GATHER_BYTES // row_bytes)
    parts = [np.asarray(multihost_utils.process_allgather(local[start:start + step], tiled=False))
             for start in range(0, len(local), step)]
    # [P, rows of the chunk, ...] per chunk -> process-major rows
    return np.concatenate([np.concatenate(list(chunks)) for chunks in zip(*parts)]) if parts else local


def _in_dataset_order(features, labels, positions, valid, n: int):
    """Rows placed at their dataset index, padding dropped; every index must appear exactly once."""
    index = positions[valid]
    if len(index) != n or len(np.unique(index)) != n:
        raise RuntimeError(f"the processes' feature rows cover {len(np.unique(index))} of {n} examples")
    out_x = np.empty((n,) + features.shape[1:], features.dtype)
    out_y = np.empty((n,), labels.dtype)
    out_x[index], out_y[index] = features[valid], labels[valid]
    return out_x, out_y


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
