"""SimCLR NT-Xent loss and its decoupled variant (DCL), exact on any device count.

Math (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", eq. 1, averaged over the 2N anchors as in its Algorithm 1):

    u = z / ||z||,   s_ik = u_i . u_k,   anchors i = 1..2N (both views),
    l_i  = -s_{i p(i)} / T + log sum_{k != i} exp(s_ik / T),
    loss = (1 / 2N) sum_i l_i,

where p(i) is the other view of the same image. ``decoupled=True`` is DCL
(Yeh et al. 2022, "Decoupled Contrastive Learning", eq. 6): the positive also
leaves the denominator, log sum_{k not in {i, p(i)}} exp(s_ik / T).

Scale: clrjax returns eq. 1's mean over the 2N anchors. The official code
(``simclr/tf2/objective.py``, ``add_contrastive_loss``) returns
``loss_a + loss_b``, each a mean over the N anchors of one view: twice this
value, so its loss curves and gradients are 2x clrjax's.

Parallel layout: shard r owns rows ``r*n : (r+1)*n`` of each view. It forms
only its own 2n anchor rows against the 2N gathered columns (columns ordered
[view a of the global batch; view b of the global batch]) and the row-loss sum
is psum-ed, so no device ever holds the 2N x 2N matrix. With ``chunk_size`` the
columns are streamed in blocks with an online log-sum-exp inside a
``lax.scan`` whose body is rematerialised (``jax.checkpoint``), so forward and
backward temporaries are O(n * chunk_size) instead of O(n * N).

Metrics (all global, identical on every shard, under stop_gradient):
  accuracy    fraction of the 2N anchors whose positive scores strictly above
              every negative k not in {i, p(i)} (top-1 among all candidates).
  alignment   mean_i ||u_a,i - u_b,i||^2 (Wang & Isola 2020, alpha = 2).
  uniformity  mean over the two views of
              log[ 1/(N(N-1)) sum_{i != j} exp(-2 ||u_i - u_j||^2) ] (t = 2).
  embedding_std, rankme   collapse monitors of view a (see collapse.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses import collapse
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._streaming import (MASKED, check_chunk_size, masked_logsumexp_terms, merge_logsumexp,
                                      stream_columns)
from clrjax.losses._validation import check_embedding_pair, check_global_batch, check_positive

_UNIFORMITY_T = 2.0


class _RowStats(NamedTuple):
    """Running statistics of each anchor row over the columns seen so far."""

    shift: jax.Array  # [2n] max of the denominator logits (stop_gradient)
    sumexp: jax.Array  # [2n] sum exp(logit - shift) over the denominator
    max_negative: jax.Array  # [2n] max negative logit, for top-1 accuracy
    uniformity_sum: jax.Array  # [2n] sum_{same view, j != i} exp(-t ||u_i - u_j||^2)


class _Anchors(NamedTuple):
    """This shard's 2n anchor rows and their global column indices."""

    rows: jax.Array  # [2n, d] unit vectors: local view a rows, then view b
    self_ids: jax.Array  # [2n] column index of the anchor itself
    positive_ids: jax.Array  # [2n] column index of its positive
    is_view_b: jax.Array  # [2n] bool


def _block_stats(anchors: _Anchors, cols, col_ids, n_columns, temperature, decoupled):
    """Statistics of the anchors against one block of columns ``cols`` [c, d]."""
    sims = anchors.rows @ cols.T  # [2n, c]
    logits = sims / temperature
    valid = col_ids[None, :] < n_columns  # padding columns of the last block
    not_self = col_ids[None, :] != anchors.self_ids[:, None]
    not_positive = col_ids[None, :] != anchors.positive_ids[:, None]
    in_denominator = valid & not_self
    if decoupled:
        in_denominator = in_denominator & not_positive
    shift, sumexp = masked_logsumexp_terms(logits, in_denominator)

    frozen = jax.lax.stop_gradient(logits)
    negative = valid & not_self & not_positive
    max_negative = jnp.max(jnp.where(negative, frozen, MASKED), axis=1)
    same_view = (col_ids[None, :] >= n_columns // 2) == anchors.is_view_b[:, None]
    # ||u_i - u_j||^2 = 2 - 2 s_ij for unit vectors.
    kernel = jnp.exp(-_UNIFORMITY_T * (2.0 - 2.0 * jax.lax.stop_gradient(sims)))
    uniformity_sum = jnp.sum(jnp.where(valid & not_self & same_view, kernel, 0.0), axis=1)
    return _RowStats(shift, sumexp, max_negative, uniformity_sum)


def _merge(a: _RowStats, b: _RowStats) -> _RowStats:
    """Online log-sum-exp merge of two column blocks' statistics."""
    shift, sumexp = merge_logsumexp(a.shift, a.sumexp, b.shift, b.sumexp)
    return _RowStats(
        shift,
        sumexp,
        jnp.maximum(a.max_negative, b.max_negative),
        a.uniformity_sum + b.uniformity_sum,
    )


def _streamed_stats(anchors, cols, temperature, decoupled, chunk_size):
    """Row statistics over all columns, ``chunk_size`` columns at a time (see _streaming.py)."""
    n_columns = cols.shape[0]

    def stats_of(block, ids):
        return _block_stats(anchors, block, ids, n_columns, temperature, decoupled)

    return stream_columns(stats_of, _merge, cols, chunk_size)


def _anchors(u_a, u_b, axis_name) -> _Anchors:
    n_local = u_a.shape[0]
    n_global = col.global_batch_size(n_local, axis_name)
    local_ids = col.axis_index(axis_name) * n_local + jnp.arange(n_local)
    return _Anchors(
        rows=jnp.concatenate([u_a, u_b], axis=0),
        self_ids=jnp.concatenate([local_ids, local_ids + n_global]),
        positive_ids=jnp.concatenate([local_ids + n_global, local_ids]),
        is_view_b=jnp.arange(2 * n_local) >= n_local,
    )


def simclr_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    temperature: float = 0.1,
    decoupled: bool = False,
    chunk_size: Optional[int] = None,
    axis_name=None,
    monitors: bool = True,
):
    """NT-Xent (or DCL) loss of the global batch, computed from this shard's rows.

    Args:
      z_a, z_b: [n_local, d] projector outputs of the two views (any float dtype;
        the math runs in float32). Row i of both is the same image.
      temperature: T > 0.
      decoupled: drop the positive from the denominator (DCL).
      chunk_size: None for one dense [2n, 2N] block; else stream the 2N columns
        in blocks of this many (any positive int; need not divide 2N).
      axis_name: the mapped axis of shard_map/pmap, or None on one device.
      monitors: also compute the collapse monitors (an SVD of the [N, d] batch).

    Returns:
      (loss, metrics): loss is the global mean over the 2N anchors (the same
      scalar on every shard); metrics is a dict of global scalars.
    """
    check_embedding_pair(z_a, z_b)
    check_positive("temperature", temperature)
    check_chunk_size(chunk_size)
    n_global = col.global_batch_size(z_a.shape[0], axis_name)
    if decoupled:
        check_global_batch(n_global, 2, "Decoupled SimCLR (every anchor needs a negative)")

    u_a = l2_normalize(z_a.astype(jnp.float32))
    u_b = l2_normalize(z_b.astype(jnp.float32))
    anchors = _anchors(u_a, u_b, axis_name)
    cols = jnp.concatenate([col.all_gather(u_a, axis_name), col.all_gather(u_b, axis_name)])

    if chunk_size is None or chunk_size >= cols.shape[0]:
        stats = _block_stats(anchors, cols, jnp.arange(cols.shape[0]), cols.shape[0],
                             temperature, decoupled)
    else:
        stats = _streamed_stats(anchors, cols, temperature, decoupled, chunk_size)

    pair_sim = jnp.sum(u_a * u_b, axis=1)
    positive_logit = jnp.concatenate([pair_sim, pair_sim]) / temperature
    row_loss = stats.shift + jnp.log(stats.sumexp) - positive_logit
    loss = col.psum(jnp.sum(row_loss), axis_name) / (2 * n_global)

    metrics = _metrics(stats, jax.lax.stop_gradient(positive_logit),
                       jax.lax.stop_gradient(pair_sim), n_global, axis_name)
    if monitors:
        metrics.update(collapse.collapse_metrics(z_a, axis_name))
    return loss, metrics


def _metrics(stats: _RowStats, positive_logit, pair_sim, n_global, axis_name) -> dict:
    n_local = pair_sim.shape[0]
    correct = (positive_logit > stats.max_negative).astype(jnp.float32)
    accuracy = col.psum(jnp.sum(correct), axis_name) / (2 * n_global)
    alignment = col.psum(jnp.sum(2.0 - 2.0 * pair_sim), axis_name) / n_global
    # log of the pair count as a Python float: N (N - 1) overflows int32 at N = 65,536.
    log_pairs = math.log(max(n_global * (n_global - 1), 1))
    per_view = [col.psum(jnp.sum(stats.uniformity_sum[v * n_local:(v + 1) * n_local]), axis_name)
                for v in (0, 1)]
    uniformity = 0.5 * (jnp.log(per_view[0]) + jnp.log(per_view[1])) - log_pairs
    return {"accuracy": accuracy, "alignment": alignment, "uniformity": uniformity}
