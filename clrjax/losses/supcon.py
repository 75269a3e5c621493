"""Supervised Contrastive loss (SupCon, L_out), exact on any device count.

Math (Khosla et al. 2020, "Supervised Contrastive Learning", eq. 2, the
``L^sup_out`` variant that Sec. 3.2.1 / Table 1 recommend over ``L^sup_in``):

    u = z / ||z||,   s_ik = u_i . u_k,   anchors i in I = both views of all N images,
    A(i) = I \\ {i},   P(i) = {p in A(i) : y_p = y_i},
    l_i  = -(1 / |P(i)|) sum_{p in P(i)} log( exp(s_ip / T) / sum_{a in A(i)} exp(s_ia / T) )
         = log sum_{a in A(i)} exp(s_ia / T)  -  (1 / |P(i)|) sum_{p in P(i)} s_ip / T,
    loss = (1 / 2N) sum_i l_i.

From the paper (eq. 2): the anchor set (every view of every image, the
official code's ``contrast_mode='all'``), the denominator over all 2N - 1
other views A(i), the positives P(i) (every other view with the same label,
so the other view of the same image is always one), and 1/|P(i)| outside the
log.

Conventions (not in eq. 2):
  * Mean, not sum, over the 2N anchors. Eq. 2 sums over i in I; the official
    code (github.com/HobbitLong/SupContrast, ``losses.py``) takes the mean, as
    does :func:`clrjax.losses.simclr_loss`. With the mean, all-distinct labels
    give exactly SimCLR's NT-Xent, and the scale does not grow with the batch.
  * No ``temperature / base_temperature`` factor. The official code multiplies
    the loss by it (defaults 0.07 / 0.07, i.e. 1); it is not in the paper and
    only rescales the gradient when T != base_temperature. This loss does not
    apply it; to reproduce the official code at another T, multiply by
    T / base_temperature yourself.
  * |P(i)| is never 0 here (both views are anchors, each is the other's
    positive), so the official code's guard against empty P(i) is not needed.
  * Embeddings are L2-normalised inside (as in the paper's projection head and
    simclr_loss), in float32.

Parallel layout (as simclr_loss): shard r owns rows ``r*n : (r+1)*n`` of each
view and their labels. It forms only its 2n anchor rows against the 2N
gathered columns ([view a of the global batch; view b of the global batch])
and psums the row-loss sum, so no device holds the 2N x 2N matrix. Labels are
gathered alongside (no gradient). With ``chunk_size`` the columns stream in
blocks: an online log-sum-exp for the denominator plus running sums of the
positive logits and of |P(i)|, inside a ``lax.scan`` whose body is
rematerialised (``jax.checkpoint``), so temporaries are O(n * chunk_size).

Metrics (global, identical on every shard, under stop_gradient):
  accuracy        fraction of the 2N anchors whose top-scoring other view
                  (argmax over k != i) is a positive (strictly above every negative).
  mean_positives  mean over the 2N anchors of |P(i)| (1 when all labels differ).
  embedding_std, rankme   collapse monitors of view a (see collapse.py).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses import collapse
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._streaming import (MASKED, check_chunk_size, masked_logsumexp_terms, merge_logsumexp,
                                      stream_columns)
from clrjax.losses._validation import check_embedding_pair, check_labels, check_positive



class _RowStats(NamedTuple):
    """Running statistics of each anchor row over the columns seen so far."""

    shift: jax.Array  # [2n] max denominator logit (stop_gradient)
    sumexp: jax.Array  # [2n] sum over A(i) of exp(logit - shift)
    positive_logit_sum: jax.Array  # [2n] sum over P(i) of s_ip / T
    positive_count: jax.Array  # [2n] |P(i)| (float32: exact to 2^24; no gradient)
    max_positive: jax.Array  # [2n] best positive logit, for top-1 accuracy
    max_negative: jax.Array  # [2n] best negative logit, for top-1 accuracy


class _Anchors(NamedTuple):
    """This shard's 2n anchor rows, their global column indices and labels."""

    rows: jax.Array  # [2n, d] unit vectors: local view a rows, then view b
    self_ids: jax.Array  # [2n] column index of the anchor itself
    labels: jax.Array  # [2n] class label of each anchor


class _Columns(NamedTuple):
    """One block of the 2N gathered columns."""

    vectors: jax.Array  # [c, d] unit vectors
    ids: jax.Array  # [c] global column index; >= n_columns marks padding
    labels: jax.Array  # [c]


def _block_stats(anchors: _Anchors, cols: _Columns, n_columns, temperature) -> _RowStats:
    """Statistics of the anchors against one block of columns."""
    logits = (anchors.rows @ cols.vectors.T) / temperature  # [2n, c]
    valid = cols.ids[None, :] < n_columns  # padding columns of the last block
    in_denominator = valid & (cols.ids[None, :] != anchors.self_ids[:, None])  # A(i)
    positive = in_denominator & (cols.labels[None, :] == anchors.labels[:, None])  # P(i)

    shift, sumexp = masked_logsumexp_terms(logits, in_denominator)
    positive_logit_sum = jnp.sum(jnp.where(positive, logits, 0.0), axis=1)
    positive_count = jnp.sum(positive.astype(jnp.float32), axis=1)

    frozen = jax.lax.stop_gradient(logits)
    max_positive = jnp.max(jnp.where(positive, frozen, MASKED), axis=1)
    max_negative = jnp.max(jnp.where(in_denominator & ~positive, frozen, MASKED), axis=1)
    return _RowStats(shift, sumexp, positive_logit_sum, positive_count, max_positive,
                     max_negative)


def _merge(a: _RowStats, b: _RowStats) -> _RowStats:
    """Online log-sum-exp merge of two column blocks' statistics."""
    shift, sumexp = merge_logsumexp(a.shift, a.sumexp, b.shift, b.sumexp)
    return _RowStats(
        shift,
        sumexp,
        a.positive_logit_sum + b.positive_logit_sum,
        a.positive_count + b.positive_count,
        jnp.maximum(a.max_positive, b.max_positive),
        jnp.maximum(a.max_negative, b.max_negative),
    )


def _streamed_stats(anchors: _Anchors, cols: _Columns, temperature, chunk_size) -> _RowStats:
    """Row statistics over all columns, ``chunk_size`` columns at a time (see _streaming.py)."""
    n_columns = cols.vectors.shape[0]

    def stats_of(block, ids):
        return _block_stats(anchors, _Columns(block["vectors"], ids, block["labels"]), n_columns, temperature)

    return stream_columns(stats_of, _merge, {"vectors": cols.vectors, "labels": cols.labels}, chunk_size)


def _anchors(u_a, u_b, labels, axis_name) -> _Anchors:
    n_local = u_a.shape[0]
    n_global = col.global_batch_size(n_local, axis_name)
    local_ids = col.axis_index(axis_name) * n_local + jnp.arange(n_local)
    return _Anchors(
        rows=jnp.concatenate([u_a, u_b], axis=0),
        self_ids=jnp.concatenate([local_ids, local_ids + n_global]),
        labels=jnp.concatenate([labels, labels]),
    )


def _columns(u_a, u_b, labels, axis_name) -> _Columns:
    """The 2N global columns; the labels' gather needs no backward pass."""
    global_labels = col.all_gather(jax.lax.stop_gradient(labels), axis_name)
    vectors = jnp.concatenate([col.all_gather(u_a, axis_name), col.all_gather(u_b, axis_name)])
    return _Columns(vectors=vectors, ids=jnp.arange(vectors.shape[0]),
                    labels=jnp.concatenate([global_labels, global_labels]))


def supcon_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    labels: jax.Array,
    *,
    temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    axis_name=None,
    monitors: bool = True,
):
    """SupCon L_out loss of the global batch, computed from this shard's rows.

    Args:
      z_a, z_b: [n_local, d] projector outputs of the two views (any float dtype;
        the math runs in float32). Row i of both is the same image.
      labels: [n_local] integer class labels of this shard's images (shared by
        both views).
      temperature: T > 0.
      chunk_size: None for one dense [2n, 2N] block; else stream the 2N columns
        in blocks of this many (any positive int; need not divide 2N).
      axis_name: the mapped axis of shard_map/pmap, or None on one device.
      monitors: also compute the collapse monitors (an SVD of the [N, d] batch).

    Returns:
      (loss, metrics): loss is the global mean over the 2N anchors (the same
      scalar on every shard); metrics is a dict of global scalars.
    """
    check_embedding_pair(z_a, z_b)
    check_labels(labels, z_a.shape[0])
    check_positive("temperature", temperature)
    check_chunk_size(chunk_size)
    n_global = col.global_batch_size(z_a.shape[0], axis_name)

    u_a = l2_normalize(z_a.astype(jnp.float32))
    u_b = l2_normalize(z_b.astype(jnp.float32))
    anchors = _anchors(u_a, u_b, labels, axis_name)
    cols = _columns(u_a, u_b, labels, axis_name)

    n_columns = cols.vectors.shape[0]
    if chunk_size is None or chunk_size >= n_columns:
        stats = _block_stats(anchors, cols, n_columns, temperature)
    else:
        stats = _streamed_stats(anchors, cols, temperature, chunk_size)

    # |P(i)| >= 1 always (the other view), so the division is safe.
    row_loss = (stats.shift + jnp.log(stats.sumexp)
                - stats.positive_logit_sum / stats.positive_count)
    loss = col.psum(jnp.sum(row_loss), axis_name) / (2 * n_global)

    metrics = _metrics(jax.tree.map(jax.lax.stop_gradient, stats), n_global, axis_name)
    if monitors:
        metrics.update(collapse.collapse_metrics(z_a, axis_name))
    return loss, metrics


def _metrics(stats: _RowStats, n_global, axis_name) -> dict:
    def global_mean(per_anchor):
        return col.psum(jnp.sum(per_anchor), axis_name) / (2 * n_global)

    correct = (stats.max_positive > stats.max_negative).astype(jnp.float32)
    return {"accuracy": global_mean(correct), "mean_positives": global_mean(stats.positive_count)}
