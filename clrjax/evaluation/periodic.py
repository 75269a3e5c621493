"""Evaluators of the frozen encoder, by name, run periodically during training from ``config.evals``.

``config.evals.<name>.every_steps`` (0 = off) turns on evaluator ``<name>``;
its other fields are the evaluator's options, listed with their defaults in
:data:`EVALUATORS` and copied into every config by
:func:`clrjax.config.base_config`. Every evaluator is also run at the last
step of training when on. Features of the train and test splits are
extracted once per evaluation step and shared by every evaluator due at that
step; the results are logged like any metric (``metrics.jsonl``, TensorBoard).

An evaluator declares what it reads (``Evaluator.needs``) and returns
scalars; it never sees the trainer. ``'features'``: frozen backbone features
and labels of both splits (a :class:`~clrjax.evaluation.protocols.FeatureSet`).
``'towers'``: the test split's image embeddings and a text encoder (a
:class:`~clrjax.evaluation.zero_shot.TowerSet`), which only an image-text
method (CLIP, SigLIP, LiT) has; config validation refuses to turn one on for
any other method. The trainer hands this module an encode function (model +
eval preprocessing) and, for a two-tower model, the pair of tower functions
(:func:`clrjax.evaluation.zero_shot.tower_fns`), so nothing here imports
``clrjax.train``. Each kind is computed only at a step where an evaluator
needing it is due.

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
zero_shot   zero-shot classification of the test split        ``zero_shot_top1``,
            (CLIP sec. 3.1.4: class names in prompt           ``zero_shot_top5``
            ``templates``, the normalised embeddings
            averaged; () = the dataset's own templates);
            image-text methods only
retrieval   image->text and text->image Recall@1/5/10 of      ``retrieval_i2t_r1`` ... ``_r10``,
            the test split's images and captions,             ``retrieval_t2i_r1`` ... ``_r10``
            scored in blocks of texts; image-text only
==========  ===============================================  ===================================

The names are those of the final report (``eval.json``) and of
``experiments/zero_shot_eval.py``'s JSON.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clrjax import parallel
from clrjax.data import sources
from clrjax.evaluation import protocols, zero_shot
from clrjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """A named evaluation of frozen features: ``run(fs, options) -> {metric: float}``."""

    name: str
    run: Callable[[Any, Mapping[str, Any]], Dict[str, float]]
    options: Mapping[str, Any]     # the evaluator's own config fields with their defaults
    doc: str
    needs: str = "features"        # what ``run`` receives: one of NEEDS (module docstring)


# 'features': a protocols.FeatureSet of both splits; 'towers': a zero_shot.TowerSet of the test split.
NEEDS = ("features", "towers")


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


def _zero_shot(ts, options) -> Dict[str, float]:
    return zero_shot.zero_shot_metrics(ts, tuple(options["templates"]))


def _retrieval(ts, options) -> Dict[str, float]:
    del options
    return zero_shot.retrieval_metrics(ts)


KNN = Evaluator("knn", _knn, {"k": (20,), "temperature": protocols.KNN_TEMPERATURE},
                "weighted kNN top-1 of the test split against the train split")
LINEAR = Evaluator("linear", _linear, {}, "linear probe on frozen features")
FEWSHOT = Evaluator("fewshot", _fewshot, {"shots": (10,), "seeds": 3}, "few-shot linear probe")
COLLAPSE = Evaluator("collapse", _collapse, {}, "collapse monitors of the backbone features")
ZERO_SHOT = Evaluator("zero_shot", _zero_shot, {"templates": ()},
                      "zero-shot top-1/top-5 of the test split from its class names", needs="towers")
RETRIEVAL = Evaluator("retrieval", _retrieval, {}, "image<->text Recall@1/5/10 of the test split",
                      needs="towers")

EVALUATORS = Registry("evaluator", {
    "knn": "clrjax.evaluation.periodic:KNN",
    "linear": "clrjax.evaluation.periodic:LINEAR",
    "fewshot": "clrjax.evaluation.periodic:FEWSHOT",
    "collapse": "clrjax.evaluation.periodic:COLLAPSE",
    "zero_shot": "clrjax.evaluation.periodic:ZERO_SHOT",
    "retrieval": "clrjax.evaluation.periodic:RETRIEVAL",
}, attribute="EVALUATOR")


def enabled(config) -> Dict[str, int]:
    """``{name: every_steps}`` of the evaluators switched on in ``config.evals``."""
    return {name: int(cfg["every_steps"]) for name, cfg in config.evals.items() if cfg["every_steps"] > 0}


def needs_of(names) -> set:
    """What the evaluators ``names`` read (a subset of :data:`NEEDS`)."""
    return {EVALUATORS.get(name).needs for name in names}


def data_problem(config, test_source) -> Optional[str]:
    """Why an evaluator switched on in ``config.evals`` cannot score ``test_source``, as one
    sentence naming the field (None if all can); the trainer checks this before the first step."""
    problems = {"zero_shot": zero_shot.zero_shot_problem, "retrieval": zero_shot.retrieval_problem}
    for name in enabled(config):
        problem = problems[name](test_source) if name in problems else None
        if problem:
            split = config.dataset.test_split
            return (f"config.evals.{name}.every_steps is {config.evals[name].every_steps} but the test split "
                    f"{split!r} of {config.dataset.name} {problem}; set --config.evals.{name}.every_steps=0 or "
                    f"use a test split that has them.")
    return None


class PeriodicEvaluation:
    """Callable ``(state_variables, step, total_steps) -> {metric: float}`` for the training loop.

    ``encode_fn(variables, uint8 images) -> features`` is compiled once with
    the variables as arguments, so each evaluation costs only forward passes.
    ``towers`` (a two-tower model only) is ``(embed_image, encode_text)`` as
    :func:`clrjax.evaluation.zero_shot.tower_fns` returns them, for the
    evaluators that need ``'towers'``. It runs on this process's local
    devices, like the end-of-run evaluation.
    """

    def __init__(self, encode_fn, config, towers: Optional[Tuple[Callable, Callable]] = None):
        self._config = config
        self._every = enabled(config)
        if "towers" in needs_of(self._every) and towers is None:
            raise ValueError("an evaluator of config.evals needs a text tower but the model has none")
        self._mesh = protocols.eval_mesh()
        self._encode = encode_fn
        self._towers = towers
        self._splits: Dict[str, Any] = {}  # loaded at the first evaluation that reads them, then kept

    def due(self, step: int, total_steps: int) -> list:
        return [name for name, every in self._every.items() if step % every == 0 or step == total_steps]

    def _split(self, field: str):
        if field not in self._splits:
            self._splits[field] = sources.load_source(self._config.dataset.to_dict(), self._config.dataset[field])
        return self._splits[field]

    def __call__(self, variables, step: int, total_steps: int) -> Dict[str, float]:
        names = self.due(step, total_steps)
        if not names:
            return {}
        replicated = parallel.replicate(jax.device_get(variables), self._mesh)
        needs = needs_of(names)
        inputs = {}
        if "features" in needs:
            splits = (self._split("train_split"), self._split("test_split"))
            inputs["features"] = protocols.features_of_splits(self._encode, replicated, splits,
                                                              self._config.eval, self._mesh)
        if "towers" in needs:
            inputs["towers"] = zero_shot.tower_set(self._towers, replicated, self._split("test_split"),
                                                   self._config, self._mesh)
        results: Dict[str, float] = {}
        for name in names:
            evaluator = EVALUATORS.get(name)
            results.update({k: float(np.asarray(v)) for k, v in
                            evaluator.run(inputs[evaluator.needs], self._config.evals[name]).items()})
        return results
