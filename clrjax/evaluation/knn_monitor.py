"""Periodic kNN accuracy of the encoder during pretraining.

Every ``config.eval.knn_every_steps`` steps the trainer encodes the training
split (the bank) and the test split with the current encoder in inference
mode and reports weighted-kNN top-1 (Wu et al. 2018; k and temperature from
``config.eval``). The encoder function is compiled once with the variables as
arguments, so each evaluation costs only the forward passes. It runs on this
process's local devices (every process computes the same numbers; no
cross-host collectives), like the end-of-run evaluation.
"""
from __future__ import annotations

import jax
import numpy as np

from clrjax import parallel
from clrjax.data import augment, pipeline, sources
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
        self._batch = run_eval.eval_batch_size(config.eval.batch_size, self._mesh.size)
        aug_cfg = config.augment.to_dict()

        def features(variables, images):
            x = augment.preprocess_eval(images, aug_cfg)
            return model.apply(variables, x, train=False, method=model.encode)

        self._features = jax.jit(features)

    def _encode(self, variables, source):
        sharding = parallel.batch_sharding(self._mesh)
        chunks, labels = [], []
        for batch in pipeline.eval_batches(source, self._batch):
            feats = self._features(variables, jax.device_put(batch["image"], sharding))
            mask = np.asarray(batch["mask"])
            chunks.append(np.asarray(feats)[mask])
            labels.append(np.asarray(batch["label"])[mask])
        return np.concatenate(chunks), np.concatenate(labels)

    def __call__(self, state) -> dict:
        variables = parallel.replicate(
            jax.device_get({"params": state.params, "batch_stats": state.batch_stats}), self._mesh)
        bank, bank_labels = self._encode(variables, self._train)
        queries, query_labels = self._encode(variables, self._test)
        accs = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes=self._train.num_classes,
                            ks=tuple(self._config.eval.knn_k), temperature=self._config.eval.knn_temperature)
        return {f"knn{k}_top1": float(v["top1"]) for k, v in accs.items()}
