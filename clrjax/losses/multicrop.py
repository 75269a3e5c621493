"""Multi-crop losses (SwAV's multi-crop, Caron et al. 2020, sec. 3.2), exact on any device count.

Every image has M = 2 + V crops: crops 0 and 1 are the global crops (the
targets), crops 2..M-1 the local ones. Following SwAV (sec. 3.2, eq. 4: each
crop predicts the code of the full-resolution crops other than itself) and
DINO (Caron et al. 2021, Algorithm 1 / eq. 3: ``sum_{x in {x1g, x2g}} sum_{x'
in V, x' != x} H(P_t(x), P_s(x'))``), the crop pairs compared are

    P = {(i, j) : i in {0, 1} a global crop, j in 0..M-1 any crop, j != i},   |P| = 2 (M - 1),

crop j's online output against global crop i's target. Inputs are
``[n_local, M, d]`` (target inputs ``[n_local, 2, d]``: a momentum target runs
on the global crops only).

Scale: each loss is the mean over P of its pair loss, times 2, so that with
M = 2 (P = {(0, 1), (1, 0)}) it is the existing symmetrised two-view loss
(SwAV and DINO average over the pairs as well: ``loss /= n_loss_terms``).
The methods call these only when V > 0; two crops go through the original
two-view losses unchanged.

Parallel layout: as the two-view losses. BYOL's pair terms are row-wise and
psum-ed; MoCo v3's keys and the contrastive loss's columns are all-gathered
(the keys as stop-gradient constants, the columns with their gradient).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses import collapse
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._streaming import MASKED
from clrjax.losses._validation import check_positive
from clrjax.losses.moco_v3 import _contrast

NUM_GLOBAL = 2


def crop_pairs(num_crops: int):
    """The compared (global i, crop j) pairs, j != i, in a fixed order."""
    return [(i, j) for i in range(NUM_GLOBAL) for j in range(num_crops) if j != i]


def _check_crops(online, target, what):
    if online.ndim != 3 or online.shape[1] < NUM_GLOBAL:
        raise ValueError(f"{what} must be [n, 2 + V, d] (global crops first), got {online.shape}")
    if target is not None and (target.ndim != 3 or target.shape[1] != NUM_GLOBAL
                               or target.shape[0] != online.shape[0] or target.shape[2] != online.shape[2]):
        raise ValueError(f"targets must be [n, 2, d] = [{online.shape[0]}, 2, {online.shape[2]}] (the global crops), "
                         f"got {target.shape}")


def byol_multicrop_loss(p, t, *, axis_name=None):
    """BYOL over all crop pairs: (2 / |P|) (1 / N) sum_b sum_{(i, j) in P} (2 - 2 cos(p_{b,j}, t_{b,i})).

    Args:
      p: online predictions of every crop, ``[n_local, M, d]``.
      t: target projections of the two global crops, ``[n_local, 2, d]`` (no gradient).
    Returns:
      ``(loss, {'cosine'})``: cosine is the mean of cos(p_j, t_i) over the |P| N pairs.
    """
    _check_crops(p, t, "predictions")
    u_p = l2_normalize(jnp.asarray(p, jnp.float32))
    u_t = l2_normalize(jnp.asarray(jax.lax.stop_gradient(t), jnp.float32))
    pairs = crop_pairs(p.shape[1])
    cos = jnp.stack([jnp.sum(u_p[:, j] * u_t[:, i], axis=-1) for i, j in pairs], axis=1)  # [n, |P|]
    n = col.global_batch_size(p.shape[0], axis_name)
    loss = (2.0 / len(pairs)) * col.psum(jnp.sum(2.0 - 2.0 * cos), axis_name) / n
    cosine = col.psum(jnp.sum(jax.lax.stop_gradient(cos)), axis_name) / (len(pairs) * n)
    return loss, {"cosine": cosine}


def moco_v3_multicrop_loss(q, k, *, temperature=0.2, axis_name=None):
    """MoCo v3 over all crop pairs: (2 / |P|) sum_{(i, j) in P} ctr(q_j, k_i).

    ctr(q, k) = 2T (1 / N) sum_b -log softmax_c(u(q_b) . u(k_c) / T)[b]: the
    query of crop j of image b against the momentum keys of global crop i of
    every image of the global batch (all-gathered, stop-gradient), the
    positive at b (MoCo v3 Algorithm 1, as :func:`clrjax.losses.moco_v3_loss`).

    Args:
      q: online queries of every crop, ``[n_local, M, d]``.
      k: momentum keys of the two global crops, ``[n_local, 2, d]``.
    Returns:
      ``(loss, {'accuracy'})``: top-1 accuracy over the |P| N queries.
    """
    _check_crops(q, k, "queries")
    check_positive("temperature", temperature)
    pairs = crop_pairs(q.shape[1])
    n_global = col.global_batch_size(q.shape[0], axis_name)
    ce, hits = 0.0, 0
    for i, j in pairs:
        ce_ij, hits_ij = _contrast(q[:, j], k[:, i], temperature, axis_name)
        ce, hits = ce + ce_ij, hits + hits_ij
    loss = (2.0 / len(pairs)) * 2.0 * temperature * col.psum(ce, axis_name) / n_global
    accuracy = col.psum(hits, axis_name) / (len(pairs) * n_global)
    return loss, {"accuracy": accuracy}


def multicrop_contrastive_loss(z, labels=None, *, temperature=0.1, decoupled=False,
                               chunk_size: Optional[int] = None, axis_name=None, monitors=True):
    """Multi-positive SimCLR / SupCon over the global crops as columns, from this shard's rows.

    Definition (the SupCon L_out form, Khosla et al. 2020 eq. 2, with the
    columns restricted to the global crops, which are the targets):

      anchors  a = (b, j): every crop j in 0..M-1 of every image b (N M anchors);
      columns  (c, i): the global crops i in {0, 1} of every image c (2N columns);
      A(a)     every column except the anchor itself (a global anchor's own column);
      P(a)     the columns of A(a) with y_c = y_b, where y is the image's global
               index (SimCLR: the global crop(s) of the same image other than the
               anchor: 1 for a global anchor, 2 for a local one) or, with
               ``labels``, its class (SupCon: every global crop of the class);
      negatives  A(a) \\ P(a);
      l_a  = log sum_{k in A(a)} exp(s_ak / T) - (1 / |P(a)|) sum_{p in P(a)} s_ap / T,
      loss = (1 / (N M)) sum_a l_a,

    with s the cosine similarity. ``decoupled=True`` drops P(a) from the
    denominator (DCL, Yeh et al. 2022 eq. 6). With M = 2 this is exactly
    SimCLR's NT-Xent (eq. 1, mean over the 2N anchors) and, with labels, SupCon.

    Args:
      z: projector outputs of every crop, ``[n_local, M, d]`` (crops 0, 1 global).
      labels: None (SimCLR) or ``[n_local]`` integer classes (SupCon).
      chunk_size: must be None (this loss forms the dense [n M, 2N] block).
      monitors: also the collapse monitors of global crop 0.
    Returns:
      ``(loss, metrics)``: ``accuracy`` (fraction of anchors whose best
      column is a positive) and ``mean_positives`` (mean |P(a)|), global.
    """
    _check_crops(z, None, "embeddings")
    check_positive("temperature", temperature)
    if chunk_size is not None:
        raise ValueError("the multi-crop contrastive loss forms one dense block; set loss.chunk_size to None.")
    n, m = z.shape[0], z.shape[1]
    n_global = col.global_batch_size(n, axis_name)
    u = l2_normalize(jnp.asarray(z, jnp.float32))                               # [n, M, d]
    ids = col.axis_index(axis_name) * n + jnp.arange(n)                         # global image index
    y = ids if labels is None else jnp.asarray(labels)
    y_cols = col.all_gather(jax.lax.stop_gradient(y), axis_name)
    cols = jnp.concatenate([col.all_gather(u[:, i], axis_name) for i in range(NUM_GLOBAL)])  # [2N, d]
    col_y = jnp.concatenate([y_cols] * NUM_GLOBAL)
    col_ids = jnp.arange(NUM_GLOBAL * n_global)

    rows = u.reshape(n * m, -1)                                                  # anchor (b, j) at b*M + j
    crop = jnp.tile(jnp.arange(m), n)
    row_img = jnp.repeat(ids, m)
    self_col = jnp.where(crop < NUM_GLOBAL, crop * n_global + row_img, -1)       # local crops: no own column
    logits = rows @ cols.T / temperature                                         # [nM, 2N]
    in_a = col_ids[None, :] != self_col[:, None]
    positive = in_a & (col_y[None, :] == jnp.repeat(y, m)[:, None])
    denominator = in_a & ~positive if decoupled else in_a
    masked = jnp.where(denominator, logits, MASKED)
    count = jnp.sum(positive, axis=1).astype(jnp.float32)
    row_loss = (jax.nn.logsumexp(masked, axis=1)
                - jnp.sum(jnp.where(positive, logits, 0.0), axis=1) / jnp.maximum(count, 1.0))
    loss = col.psum(jnp.sum(row_loss), axis_name) / (n_global * m)

    frozen = jax.lax.stop_gradient(logits)
    best_positive = jnp.max(jnp.where(positive, frozen, MASKED), axis=1)
    best_negative = jnp.max(jnp.where(in_a & ~positive, frozen, MASKED), axis=1)
    metrics = {
        "accuracy": col.psum(jnp.sum((best_positive > best_negative).astype(jnp.float32)), axis_name)
        / (n_global * m),
        "mean_positives": col.psum(jnp.sum(count), axis_name) / (n_global * m),
    }
    if monitors:
        metrics.update(collapse.collapse_metrics(z[:, 0], axis_name))
    return loss, metrics
