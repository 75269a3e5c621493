"""Periodic kNN accuracy of the encoder during pretraining.

Every ``config.eval.knn_every_steps`` steps the trainer encodes the training
split (the bank) and the test split with the current encoder in inference
mode and reports weighted-kNN top-1 (Wu et al. 2018; k and temperature from
``config.eval``; the bank is capped at ``eval.max_train_examples`` like the
final evaluation). The encoder function is compiled once with the variables as
arguments, so each evaluation costs only the forward passes. It runs on this
process's local devices (every process computes the same numbers; no
cross-host collectives), like the end-of-run evaluation.
"""
from __future__ import annotations

import jax

from clrjax import parallel
from clrjax.data import sources
from clrjax.evaluation import run_eval
from clrjax.evaluation.knn import knn_accuracy


class KnnMonitor:
    """Callable ``state -> {'knn{k}_top1': acc, ...}`` for the trainer's metrics."""

    def __init__(self, model, config):
        self._config = config
        self._mesh = run_eval.eval_mesh()
        dataset = config.dataset.to_dict()
        self._train = sources.load_source(dataset, config.dataset.train_split)
        self._test = sources.load_source(dataset, config.dataset.test_split)
        # One function object for the whole run, so that every evaluation reuses its compilation.
        self._encode = run_eval.make_encode_fn(model, config.augment.to_dict())

    def __call__(self, state) -> dict:
        variables = parallel.replicate(
            jax.device_get({"params": state.params, "batch_stats": state.batch_stats}), self._mesh)
        fs = run_eval.split_features(self._encode, variables, self._config, self._mesh,
                                     splits=(self._train, self._test))
        accs = knn_accuracy(fs.train_x, fs.train_y, fs.test_x, fs.test_y, num_classes=fs.num_classes,
                            ks=tuple(self._config.eval.knn_k), temperature=self._config.eval.knn_temperature)
        return {f"knn{k}_top1": float(v["top1"]) for k, v in accs.items()}
