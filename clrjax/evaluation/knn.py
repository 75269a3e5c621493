"""Weighted k-nearest-neighbour evaluation of frozen features.

Wu, Xiong, Yu & Lin 2018, "Unsupervised Feature Learning via Non-Parametric
Instance Discrimination", sec. 3.4: with L2-normalised features, the cosine
similarity of a test query ``q`` to train feature ``x_i`` is ``s_i = q . x_i``.
Take the top-k train neighbours ``N_k(q)``; each votes for its class with
weight ``alpha_i = exp(s_i / T)`` (``T = 0.07``), i.e.

    score_c(q) = sum_{i in N_k(q), y_i = c} exp(s_i / T),   prediction = argmax_c score_c.

Computed blockwise so memory is ``O(test_block * (k + train_block))`` and the
``[N_test, N_train]`` similarity matrix never exists: each block of test
queries streams the train bank block by block, merging a running top-k with
``lax.top_k`` over ``[running top-k | block similarities]``.

Ties: ``lax.top_k`` returns equal values in index order and the running top-k
is placed before the new block, so among equal similarities the lower train
index wins, the same as a stable descending sort. Class-score ties go to the
lower class index (``argmax``).

``k`` larger than the train bank is clipped to the bank size with a warning:
a 200-NN on a tiny toy bank is still a well-defined (all-neighbours) vote,
and failing a whole evaluation sweep over it would be worse.
"""
from __future__ import annotations

import functools
import warnings
from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clrjax.losses._normalize import l2_normalize


def pad_rows(x: np.ndarray, multiple: int, value=0) -> np.ndarray:
    """Pads axis 0 up to a multiple of ``multiple`` with ``value``."""
    extra = -x.shape[0] % multiple
    if extra == 0:
        return x
    pad = np.full((extra,) + x.shape[1:], value, dtype=x.dtype)
    return np.concatenate([x, pad])


@functools.partial(jax.jit, static_argnames=("k",))
def _query_block_topk(queries, bank_blocks, bank_valid, *, k):
    """Top-k (similarity, train index) of ``queries [Q, F]`` over a blocked bank.

    ``bank_blocks [num_blocks, train_block, F]`` holds unit-norm train
    features; ``bank_valid [num_blocks, train_block]`` is False on padding,
    whose similarity is -inf so it never enters the top-k while k <= N_train.
    """
    queries = l2_normalize(queries.astype(jnp.float32))
    num_queries = queries.shape[0]
    train_block = bank_blocks.shape[1]

    def merge_block(carry, block):
        top_sims, top_idx = carry
        features, valid, block_id = block
        sims = queries @ features.T  # [Q, train_block]
        sims = jnp.where(valid[None, :], sims, -jnp.inf)
        idx = block_id * train_block + jnp.arange(train_block, dtype=jnp.int32)
        # Running top-k first: on equal similarity the earlier train index wins.
        all_sims = jnp.concatenate([top_sims, sims], axis=1)
        all_idx = jnp.concatenate([top_idx, jnp.broadcast_to(idx, sims.shape)], axis=1)
        top_sims, pos = jax.lax.top_k(all_sims, k)
        return (top_sims, jnp.take_along_axis(all_idx, pos, axis=1)), None

    init = (
        jnp.full((num_queries, k), -jnp.inf, jnp.float32),
        jnp.full((num_queries, k), -1, jnp.int32),
    )
    block_ids = jnp.arange(bank_blocks.shape[0], dtype=jnp.int32)
    (top_sims, top_idx), _ = jax.lax.scan(merge_block, init, (bank_blocks, bank_valid, block_ids))
    return top_sims, top_idx


def _clip_k(k: int, bank_size: int) -> int:
    if k > bank_size:
        warnings.warn(f"kNN: k={k} exceeds the train bank size {bank_size}; using k={bank_size}.")
        return bank_size
    if k < 1:
        raise ValueError(f"kNN: k must be >= 1, got {k}.")
    return k


def knn_neighbors(
    train_feats,
    test_feats,
    *,
    k: int,
    test_block: int = 256,
    train_block: int = 4096,
) -> Tuple[np.ndarray, np.ndarray]:
    """Cosine similarities ``[N_test, k]`` (descending) and train indices ``[N_test, k]``."""
    train_feats = np.asarray(train_feats, np.float32)
    test_feats = np.asarray(test_feats, np.float32)
    num_train, num_test = train_feats.shape[0], test_feats.shape[0]
    k = _clip_k(k, num_train)
    train_block = min(train_block, num_train)
    test_block = min(test_block, num_test)

    bank = l2_normalize(jnp.asarray(pad_rows(train_feats, train_block)))
    bank_blocks = bank.reshape(-1, train_block, bank.shape[-1])
    valid = np.arange(bank.shape[0]) < num_train
    bank_valid = jnp.asarray(valid.reshape(-1, train_block))

    queries = pad_rows(test_feats, test_block)
    sims, idx = [], []
    for start in range(0, queries.shape[0], test_block):
        s, i = _query_block_topk(queries[start : start + test_block], bank_blocks, bank_valid, k=k)
        sims.append(s)
        idx.append(i)
    sims = np.concatenate([np.asarray(s) for s in sims])[:num_test]
    idx = np.concatenate([np.asarray(i) for i in idx])[:num_test]
    return sims, idx


def knn_class_scores(
    neighbor_sims: np.ndarray,
    neighbor_labels: np.ndarray,
    *,
    num_classes: int,
    temperature: float = 0.07,
) -> np.ndarray:
    """``score_c = sum_{neighbours of class c} exp(s_i / T)``, as ``[N, num_classes]``.

    Computed as ``exp((s_i - 1) / T)`` (the same scores times ``exp(-1/T)``;
    argmax and ranking are unchanged) so small temperatures cannot overflow
    float32 since ``s_i <= 1``.
    """
    if temperature <= 0:
        raise ValueError(f"kNN temperature must be positive, got {temperature}.")
    weights = jnp.exp((jnp.asarray(neighbor_sims) - 1.0) / temperature)
    labels = jnp.asarray(neighbor_labels)
    rows = jnp.broadcast_to(jnp.arange(labels.shape[0])[:, None], labels.shape)
    # Scatter-add rather than a one-hot einsum: memory O(N (k + C)), not
    # O(N k C) (10k queries x k=200 x 1000 classes would be 8 GB).
    scores = jnp.zeros((labels.shape[0], num_classes), jnp.float32)
    return np.asarray(scores.at[rows, labels].add(weights))


def knn_predict(
    train_feats,
    train_labels,
    test_feats,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    test_block: int = 256,
    train_block: int = 4096,
) -> np.ndarray:
    """Weighted-kNN class predictions ``[N_test]`` int32 (Wu et al. 2018, sec. 3.4)."""
    sims, idx = knn_neighbors(train_feats, test_feats, k=k, test_block=test_block, train_block=train_block)
    labels = np.asarray(train_labels)[idx]
    scores = knn_class_scores(sims, labels, num_classes=num_classes, temperature=temperature)
    return scores.argmax(axis=1).astype(np.int32)


def topk_correct(scores: np.ndarray, labels: np.ndarray, top: int) -> np.ndarray:
    """Whether the label is among the ``top`` highest scores and has a positive score.

    The positivity check matters for kNN: with fewer than ``top`` classes
    among the neighbours, the zero-score classes are not real guesses.
    """
    top = min(top, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    label_score = np.take_along_axis(scores, labels[:, None], axis=1)[:, 0]
    return (order == labels[:, None]).any(axis=1) & (label_score > 0)


def knn_accuracy(
    train_feats,
    train_labels,
    test_feats,
    test_labels,
    *,
    num_classes: int,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    test_block: int = 256,
    train_block: int = 4096,
) -> Dict[int, Dict[str, float]]:
    """``{k: {'top1': ..., 'top5': ...}}`` for every ``k`` in ``ks``.

    The neighbours are searched once for ``max(ks)``; the top-k for a smaller
    ``k`` is the prefix of that sorted list. Keys are the requested ``k``
    (a clipped ``k`` keeps its requested key; a warning says it was clipped).
    """
    train_labels = np.asarray(train_labels)
    test_labels = np.asarray(test_labels)
    bank_size = np.shape(train_feats)[0]
    k_max = _clip_k(max(ks), bank_size)
    sims, idx = knn_neighbors(
        train_feats, test_feats, k=k_max, test_block=test_block, train_block=train_block
    )
    neighbor_labels = train_labels[idx]
    results = {}
    for k in ks:
        kk = min(k, bank_size)
        scores = knn_class_scores(
            sims[:, :kk], neighbor_labels[:, :kk], num_classes=num_classes, temperature=temperature
        )
        results[k] = {
            "top1": float(np.mean(scores.argmax(axis=1) == test_labels)),
            "top5": float(np.mean(topk_correct(scores, test_labels, 5))),
        }
    return results
