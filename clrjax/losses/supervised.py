"""Softmax cross-entropy of class logits over the views of the global batch.

The supervised baseline next to the self-supervised methods: the same
encoder, augmentations, optimizer and step count, trained on the labels.

    loss = (1 / 2N) sum_{i, v} CE(softmax(logits_{i,v}), y_i),    v in {a, b}

with optional label smoothing eps (Szegedy et al. 2016, sec. 7: the target
is (1 - eps) one_hot(y) + eps / C). Per shard: the local sum is psum-ed and
divided by the global count, so the value and gradients are those of the
global batch on any number of devices.

Metrics: ``accuracy`` (top-1 of the logits over the 2N views).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._validation import check_embedding_pair, check_labels


def supervised_ce_loss(logits_a, logits_b, labels, *, label_smoothing: float = 0.0, axis_name=None):
    """Cross-entropy of both views' ``[n_local, C]`` logits against ``labels`` [n_local].

    Returns (loss, metrics); loss is the mean over the 2N views of the global batch.
    """
    check_embedding_pair(logits_a, logits_b)
    check_labels(labels, logits_a.shape[0])
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}; pass e.g. 0.1.")
    logits = jnp.concatenate([logits_a, logits_b]).astype(jnp.float32)
    targets = jnp.concatenate([labels, labels])
    num_classes = logits.shape[-1]
    log_p = jax.nn.log_softmax(logits)
    one_hot = jax.nn.one_hot(targets, num_classes)
    soft = (1.0 - label_smoothing) * one_hot + label_smoothing / num_classes
    n_views = 2 * col.global_batch_size(logits_a.shape[0], axis_name)
    loss = col.psum(-jnp.sum(soft * log_p), axis_name) / n_views
    correct = jnp.argmax(jax.lax.stop_gradient(logits), -1) == targets
    accuracy = col.psum(jnp.sum(correct.astype(jnp.float32)), axis_name) / n_views
    return loss, {"accuracy": accuracy}
