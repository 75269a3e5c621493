"""CLIP's symmetric image-text InfoNCE loss, exact on any device count.

Math (Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision", Sec. 2.3 and the numpy-like pseudocode of Figure 3):

    u_i = img_i / ||img_i||,   v_j = txt_j / ||txt_j||,   s = exp(logit_scale),
    L_ij = s * u_i . v_j                                   (N x N logits),
    i2t  = (1/N) sum_i [ log sum_j exp(L_ij) - L_ii ]      (image -> text CE),
    t2i  = (1/N) sum_j [ log sum_i exp(L_ij) - L_jj ]      (text -> image CE),
    loss = (i2t + t2i) / 2.

The multiplier is learnable through its logarithm ``logit_scale`` (Figure 3
writes it ``np.exp(t)``; the official model code, github.com/openai/CLIP
``clip/model.py``, initialises ``logit_scale = log(1 / 0.07)``). Sec. 2.5 says
the temperature was "clipped to prevent scaling the logits by more than 100".
OpenAI released no training code; open_clip (github.com/mlfoundations/open_clip,
``src/training/train.py``) clamps the parameter to [0, log 100] in place after
each optimizer step. Here the cap is applied inside the loss instead, so a raw
parameter can be passed: ``s = exp(min(logit_scale, log 100))``.

Gradient at the cap: it is the derivative of the clipped function. For
``logit_scale < log 100`` it is the ordinary one; for ``logit_scale > log 100``
the multiplier is the constant 100 and d loss / d logit_scale is exactly 0, so
a raw parameter that has crossed the cap stays where it is (only weight decay
moves it back). At ``logit_scale == log 100`` exactly (float32), the value
open_clip's clamp leaves behind, the gradient is the full left derivative, so
clamping the parameter after each step as open_clip does still lets it come
down when the loss wants a smaller scale.

Parallel layout (as simclr_loss, and open_clip's ``local_loss=True,
gather_with_grad=True``): shard r owns pairs ``r*n : (r+1)*n``. Both towers'
unit vectors are all-gathered; the shard scores its own n images against all N
texts (its i2t rows) and its own n texts against all N images (its t2i rows),
so no device holds the N x N matrix, and psums the row-loss sums. The gather
transposes to a psum_scatter, so every row's gradient is the one-device one.
With ``chunk_size`` the N gathered columns stream in blocks through an online
log-sum-exp inside a rematerialised ``lax.scan`` (``_streaming.py``), so the
forward and backward temporaries are O(n * chunk_size) instead of O(n * N).

Metrics (global, identical on every shard, under stop_gradient):
  i2t_loss, t2i_loss          the two cross-entropies (loss is their mean).
  i2t_accuracy, t2i_accuracy  fraction of the N images (texts) whose own
                              caption (image) scores strictly above every other
                              one in the global batch (top-1 retrieval in-batch).
  scale                       the multiplier used, exp(min(logit_scale, log 100)).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._streaming import (MASKED, check_chunk_size, masked_logsumexp_terms, merge_logsumexp,
                                      stream_columns)
from clrjax.losses._validation import check_image_text_pair, check_scalar

INIT_LOGIT_SCALE = math.log(1.0 / 0.07)  # CLIP's initial temperature 0.07 (Sec. 2.5)
MAX_LOGIT_SCALE = math.log(100.0)  # the cap on the multiplier (Sec. 2.5)


class _RowStats(NamedTuple):
    """Running statistics of this shard's i2t and t2i rows over the columns seen."""

    i2t_shift: jax.Array  # [n] max logit (stop_gradient), image rows vs texts
    i2t_sumexp: jax.Array  # [n] sum exp(logit - shift)
    i2t_max_negative: jax.Array  # [n] best wrong caption, for top-1 accuracy
    t2i_shift: jax.Array  # [n] the same for text rows vs images
    t2i_sumexp: jax.Array
    t2i_max_negative: jax.Array


class _Rows(NamedTuple):
    """This shard's pairs: unit vectors and their global pair indices."""

    img: jax.Array  # [n, d]
    txt: jax.Array  # [n, d]
    ids: jax.Array  # [n] global index of pair i (the column of its positive)


def clipped_scale(logit_scale) -> jax.Array:
    """exp(min(logit_scale, log 100)) with a zero gradient strictly above the cap.

    ``where`` rather than ``minimum``: JAX splits the gradient of a tie in
    ``minimum`` in half, and a parameter clamped to exactly log 100 must get the
    whole left derivative (see the module docstring).
    """
    logit_scale = jnp.asarray(logit_scale, jnp.float32)
    return jnp.exp(jnp.where(logit_scale > MAX_LOGIT_SCALE, MAX_LOGIT_SCALE, logit_scale))


def _direction_stats(rows, positive_ids, cols, col_ids, n_columns, scale):
    """(shift, sumexp, max_negative) of ``rows`` [n, d] against one block of columns."""
    logits = scale * (rows @ cols.T)  # [n, c]
    valid = col_ids[None, :] < n_columns  # padding columns of the last block
    shift, sumexp = masked_logsumexp_terms(logits, valid)
    negative = valid & (col_ids[None, :] != positive_ids[:, None])
    max_negative = jnp.max(jnp.where(negative, jax.lax.stop_gradient(logits), MASKED), axis=1)
    return shift, sumexp, max_negative


def _block_stats(rows: _Rows, txt_cols, img_cols, col_ids, n_columns, scale) -> _RowStats:
    """Both directions' statistics against one block of the gathered columns."""
    i2t = _direction_stats(rows.img, rows.ids, txt_cols, col_ids, n_columns, scale)
    t2i = _direction_stats(rows.txt, rows.ids, img_cols, col_ids, n_columns, scale)
    return _RowStats(*i2t, *t2i)


def _merge(a: _RowStats, b: _RowStats) -> _RowStats:
    """Online log-sum-exp merge of two column blocks' statistics."""
    i2t_shift, i2t_sumexp = merge_logsumexp(a.i2t_shift, a.i2t_sumexp, b.i2t_shift, b.i2t_sumexp)
    t2i_shift, t2i_sumexp = merge_logsumexp(a.t2i_shift, a.t2i_sumexp, b.t2i_shift, b.t2i_sumexp)
    return _RowStats(i2t_shift, i2t_sumexp, jnp.maximum(a.i2t_max_negative, b.i2t_max_negative),
                     t2i_shift, t2i_sumexp, jnp.maximum(a.t2i_max_negative, b.t2i_max_negative))


def _column_stats(rows: _Rows, txt_all, img_all, scale, chunk_size) -> _RowStats:
    """Row statistics over all N columns: one dense block, or streamed ``chunk_size`` at a time."""
    n_columns = txt_all.shape[0]
    if chunk_size is None or chunk_size >= n_columns:
        return _block_stats(rows, txt_all, img_all, jnp.arange(n_columns), n_columns, scale)

    def stats_of(block, ids):
        txt_block, img_block = block
        return _block_stats(rows, txt_block, img_block, ids, n_columns, scale)

    return stream_columns(stats_of, _merge, (txt_all, img_all), chunk_size)


def clip_loss(
    img: jax.Array,
    txt: jax.Array,
    logit_scale,
    *,
    chunk_size: Optional[int] = None,
    axis_name=None,
):
    """CLIP's symmetric InfoNCE of the global batch, computed from this shard's pairs.

    Args:
      img, txt: [n_local, d] image- and text-tower outputs (any float dtype; the
        math runs in float32, L2-normalised inside). Row i of both is one pair.
      logit_scale: scalar, the log of the logit multiplier (a raw learnable
        parameter; init :data:`INIT_LOGIT_SCALE` = log(1/0.07)). The multiplier
        is capped at 100 inside; strictly above the cap its gradient is 0.
      chunk_size: None for dense [n, N] blocks; else stream the N gathered
        columns in blocks of this many (any positive int; need not divide N).
      axis_name: the mapped axis of shard_map/pmap, or None on one device.

    Returns:
      (loss, metrics): loss is (i2t + t2i) / 2 over the N global pairs (the same
      scalar on every shard); metrics is a dict of global scalars.
    """
    check_image_text_pair(img, txt)
    check_scalar("logit_scale", logit_scale)
    check_chunk_size(chunk_size)
    n_local = img.shape[0]
    n_global = col.global_batch_size(n_local, axis_name)

    u = l2_normalize(img.astype(jnp.float32))
    v = l2_normalize(txt.astype(jnp.float32))
    scale = clipped_scale(logit_scale)
    rows = _Rows(u, v, col.axis_index(axis_name) * n_local + jnp.arange(n_local))
    stats = _column_stats(rows, col.all_gather(v, axis_name), col.all_gather(u, axis_name),
                          scale, chunk_size)

    positive_logit = scale * jnp.sum(u * v, axis=1)
    i2t_rows = stats.i2t_shift + jnp.log(stats.i2t_sumexp) - positive_logit
    t2i_rows = stats.t2i_shift + jnp.log(stats.t2i_sumexp) - positive_logit
    i2t, t2i = col.psum(jnp.stack([jnp.sum(i2t_rows), jnp.sum(t2i_rows)]), axis_name) / n_global
    loss = 0.5 * (i2t + t2i)
    metrics = _metrics(stats, jax.lax.stop_gradient(positive_logit), n_global, axis_name)
    metrics.update(i2t_loss=jax.lax.stop_gradient(i2t), t2i_loss=jax.lax.stop_gradient(t2i),
                   scale=jax.lax.stop_gradient(scale))
    return loss, metrics


def _metrics(stats: _RowStats, positive_logit, n_global, axis_name) -> dict:
    correct = jnp.stack([jnp.sum((positive_logit > stats.i2t_max_negative).astype(jnp.float32)),
                         jnp.sum((positive_logit > stats.t2i_max_negative).astype(jnp.float32))])
    accuracy = col.psum(correct, axis_name) / n_global
    return {"i2t_accuracy": accuracy[0], "t2i_accuracy": accuracy[1]}
