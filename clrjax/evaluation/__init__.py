"""Evaluation of frozen encoders: feature extraction, weighted kNN, linear and few-shot probes."""
from clrjax.evaluation.features import extract_features
from clrjax.evaluation.fewshot import few_shot
from clrjax.evaluation.knn import knn_accuracy, knn_neighbors, knn_predict
from clrjax.evaluation.linear import (
    fit_logistic_regression,
    linear_probe_augmented,
    linear_probe_features,
)

__all__ = [
    "extract_features",
    "few_shot",
    "fit_logistic_regression",
    "knn_accuracy",
    "knn_neighbors",
    "knn_predict",
    "linear_probe_augmented",
    "linear_probe_features",
]
