"""Evaluators of the frozen encoder, by name, run periodically during training from ``config.evals``.

``config.evals.<name>.every_steps`` (0 = off) turns on evaluator ``<name>``;
its other fields are the evaluator's options, listed with their defaults in
:data:`EVALUATORS` and copied into every config by
:func:`clrjax.config.base_config`. Every evaluator is also run at the last
step of training when on. Features of the train and test splits are
extracted once per evaluation step and shared by every evaluator due at that
step; the results are logged like any metric (``metrics.jsonl``, TensorBoard).

An evaluator receives features and labels (a :class:`~clrjax.evaluation.protocols.FeatureSet`)
and returns scalars; it never sees the trainer. The trainer hands this
module an encode function (model + eval preprocessing), so nothing here
imports ``clrjax.train``.

==========  ===============================================  ===================================
name        what                                             logged as
==========  ===============================================  ===================================
knn         weighted kNN (Wu et al. 2018), test top-1         ``knn{k}_top1``
linear      the ``features`` linear probe (L2-regularised     ``linear_top1``, ``linear_top5``
            softmax regression, strength chosen on a
            held-out split; CLIP app. A.3)
fewshot     the same probe on ``shots`` labelled examples     ``fewshot{k}_top1`` (mean over
            per class, ``seeds`` draws                        the draws)
collapse    RankMe (Garrido et al. 2023, eq. 1) and the       ``rankme_features``,
            mean per-dimension std of the L2-normalised       ``feature_std``
            backbone features of the test split
==========  ===============================================  ===================================
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from clrjax import parallel
from clrjax.data import sources
from clrjax.evaluation import protocols
from clrjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A named evaluation of frozen features: ``run(fs, options) -> {metric: float}``."""

    name: str
    run: Callable[[Any, Mapping[str, Any]], Dict[str, float]]
    options: Mapping[str, Any]     # the evaluator's own config fields with their defaults
    doc: str


def _knn(fs, options) -> Dict[str, float]:
    accs = protocols.knn_result(fs, tuple(options["k"]), options["temperature"])
    return {f"knn{k}_top1": acc["top1"] for k, acc in accs.items()}


def _linear(fs, options) -> Dict[str, float]:
    del options
    result = protocols.linear_features_result(fs)
    return {"linear_top1": result["top1"], "linear_top5": result["top5"]}


def _fewshot(fs, options) -> Dict[str, float]:
    result = protocols.few_shot_result(fs, tuple(options["shots"]), int(options["seeds"]))
    return {f"fewshot{k}_top1": v["mean"] for k, v in result.items() if k != "skipped"}


def _collapse(fs, options) -> Dict[str, float]:
    del options
    from clrjax.losses import collapse  # the same monitors the losses report on embeddings
    x = jnp.asarray(fs.test_x, jnp.float32)
    return {"rankme_features": float(collapse.rankme(x)), "feature_std": float(collapse.embedding_std(x))}


KNN = Evaluator("knn", _knn, {"k": (20,), "temperature": protocols.KNN_TEMPERATURE},
                "weighted kNN top-1 of the test split against the train split")
LINEAR = Evaluator("linear", _linear, {}, "linear probe on frozen features")
FEWSHOT = Evaluator("fewshot", _fewshot, {"shots": (10,), "seeds": 3}, "few-shot linear probe")
COLLAPSE = Evaluator("collapse", _collapse, {}, "collapse monitors of the backbone features")

EVALUATORS = Registry("evaluator", {
    "knn": "clrjax.evaluation.periodic:KNN",
    "linear": "clrjax.evaluation.periodic:LINEAR",
    "fewshot": "clrjax.evaluation.periodic:FEWSHOT",
    "collapse": "clrjax.evaluation.periodic:COLLAPSE",
}, attribute="EVALUATOR")


def enabled(config) -> Dict[str, int]:
    """``{name: every_steps}`` of the evaluators switched on in ``config.evals``."""
    return {name: int(cfg["every_steps"]) for name, cfg in config.evals.items() if cfg["every_steps"] > 0}


class PeriodicEvaluation:
    """Callable ``(state_variables, step, total_steps) -> {metric: float}`` for the training loop.

    ``encode_fn(variables, uint8 images) -> features`` is compiled once with
    the variables as arguments, so each evaluation costs only forward passes.
    It runs on this process's local devices, like the end-of-run evaluation.
    """

    def __init__(self, encode_fn, config):
        self._config = config
        self._every = enabled(config)
        self._mesh = protocols.eval_mesh()
        self._encode = encode_fn
        self._splits = None  # loaded at the first evaluation, then kept

    def due(self, step: int, total_steps: int) -> list:
        return [name for name, every in self._every.items() if step % every == 0 or step == total_steps]

    def __call__(self, variables, step: int, total_steps: int) -> Dict[str, float]:
        names = self.due(step, total_steps)
        if not names:
            return {}
        if self._splits is None:
            dataset = self._config.dataset.to_dict()
            self._splits = tuple(sources.load_source(dataset, self._config.dataset[split])
                                 for split in ("train_split", "test_split"))
        replicated = parallel.replicate(jax.device_get(variables), self._mesh)
        fs = protocols.features_of_splits(self._encode, replicated, self._splits, self._config.eval, self._mesh)
        results: Dict[str, float] = {}
        for name in names:
            results.update({k: float(np.asarray(v)) for k, v in
                            EVALUATORS.get(name).run(fs, self._config.evals[name]).items()})
        return results
