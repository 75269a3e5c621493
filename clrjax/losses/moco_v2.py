"""MoCo v2's InfoNCE against a queue of past keys, and the device-invariant queue update.

Math (He et al. 2019, "Momentum Contrast", eq. 1 and Algorithm 1; MoCo v2:
Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning",
which keeps this loss and sets T = 0.2, an MLP head and stronger augmentation):
with q the online projections of view a (queries), k the momentum encoder's
projections of view b (keys), u(x) = x / ||x|| and the queue Q [K, d] of unit
keys from earlier steps,

    l_i = -log( exp(u(q_i) . u(k_i) / T) / (exp(u(q_i) . u(k_i) / T) + sum_j exp(u(q_i) . Q_j / T)) ),
    loss = (1 / N) sum_i l_i                 (one direction, as the official code).

No gradient flows into the keys or the queue.

The queue (:func:`enqueue`) is a ring buffer: after the loss, the unit keys
of the *whole global batch*, all-gathered in global example order, overwrite
rows ``ptr : ptr + N`` (the oldest) and ``ptr`` advances by N modulo K. K
must be a multiple of N (as in the official code's assertion), so a batch
never wraps. The queue and pointer are replicated: every shard scores its
queries against all K rows, so each needs the whole queue, and the gathered
keys are already replicated, so the update needs no further communication
and the queue's content after any step is the same on any device count.

Parallel layout: each shard scores its n queries against its own n keys and
the replicated queue (n x (1 + K) logits), the row losses are psum-ed.

Metrics (global, under stop_gradient):
  accuracy   fraction of the N queries whose positive scores strictly above every queue key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._validation import check_embedding_pair, check_positive


def moco_v2_loss(q, k, queue, *, temperature=0.2, axis_name=None):
    """MoCo loss of the global batch from this shard's rows.

    Args:
      q: online queries of view a, ``[n_local, d]``.
      k: momentum-encoder keys of view b, ``[n_local, d]`` (no gradient).
      queue: ``[K, d]`` unit keys of earlier steps, replicated (no gradient).
      temperature: softmax temperature T (MoCo v2: 0.2).
      axis_name: the named data axis under shard_map/pmap; None on one device.
    Returns:
      ``(loss, metrics)`` with ``metrics = {'accuracy'}``, both global.
    """
    check_embedding_pair(q, k)
    check_positive("temperature", temperature)
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"the queue must be [K, {q.shape[1]}], got {queue.shape}; it holds keys of the "
                         "projector's out_dim.")
    u_q = l2_normalize(jnp.asarray(q, jnp.float32))
    u_k = l2_normalize(jnp.asarray(jax.lax.stop_gradient(k), jnp.float32))
    negatives = u_q @ jax.lax.stop_gradient(queue).astype(jnp.float32).T / temperature  # [n, K]
    positive = jnp.sum(u_q * u_k, axis=1) / temperature                                  # [n]
    lse = jnp.logaddexp(positive, jax.nn.logsumexp(negatives, axis=1))
    n_global = col.global_batch_size(q.shape[0], axis_name)
    loss = col.psum(jnp.sum(lse - positive), axis_name) / n_global
    hits = jnp.sum(jax.lax.stop_gradient(positive > jnp.max(negatives, axis=1)))
    return loss, {"accuracy": col.psum(hits, axis_name) / n_global}


def enqueue(queue, ptr, k, *, axis_name=None):
    """(new_queue, new_ptr): the global batch's unit keys replace rows ptr : ptr + N; ptr += N mod K."""
    keys = col.all_gather_constant(l2_normalize(jnp.asarray(jax.lax.stop_gradient(k), jnp.float32)), axis_name)
    size, n_global = queue.shape[0], keys.shape[0]
    if size % n_global:
        raise ValueError(f"the queue size {size} is not a multiple of the global batch {n_global}; "
                         "set config.queue.size to a multiple of config.batch_size.")
    new_queue = jax.lax.dynamic_update_slice(queue, keys.astype(queue.dtype), (ptr, jnp.zeros_like(ptr)))
    return new_queue, (ptr + n_global) % size
