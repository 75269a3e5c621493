"""MoCo v3's symmetrised InfoNCE between online queries and momentum keys, exact on any device count.

Math (Chen, Xie & He 2021, "An Empirical Study of Training Self-Supervised
Vision Transformers", sec. 3, Algorithm 1): with q the online predictor's
outputs (queries) and k the momentum encoder's projections (keys), u(x) =
x / ||x||, and the keys of the *global* batch as the candidates,

    ctr(q, k) = 2T * (1/N) sum_i -log( exp(u(q_i) . u(k_i) / T) / sum_j exp(u(q_i) . u(k_j) / T) ),
    loss = ctr(q_a, k_b) + ctr(q_b, k_a):

cross-entropy of the [N, N] logits u(q) . u(k)^T / T with the positive at
the query's own global index, scaled by 2T as in the official code
(``moco/builder.py`` ``contrastive_loss``, ``CrossEntropyLoss()(logits,
labels) * (2 * self.T)``). No gradient flows into the keys (stop_gradient
here; the momentum encoder changes only through its EMA).

Parallel layout: the keys (no gradient) are all-gathered as replicated
constants (``all_gather_constant``); each shard scores its n query rows
against the N gathered keys, the positive of local row r on shard s is
global column s*n + r, and the row losses are psum-ed. No device holds more
than n x N logits.

Metrics (global, under stop_gradient):
  accuracy   fraction of the 2N queries whose positive key scores strictly
             above every other key (top-1 of the N-way contrast).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._validation import check_embedding_pair, check_positive


def _contrast(q, k, temperature, axis_name):
    """(sum over this shard's queries of the cross-entropy, number of top-1 hits)."""
    u_q = l2_normalize(jnp.asarray(q, jnp.float32))
    keys = col.all_gather_constant(l2_normalize(jnp.asarray(jax.lax.stop_gradient(k), jnp.float32)), axis_name)
    logits = u_q @ keys.T / temperature                                   # [n, N]
    n = q.shape[0]
    positive = col.axis_index(axis_name) * n + jnp.arange(n)              # global index of each query's key
    positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
    ce = jax.nn.logsumexp(logits, axis=1) - positive_logit
    others = jnp.where(jnp.arange(keys.shape[0])[None, :] == positive[:, None], -jnp.inf, logits)
    hits = jnp.sum(jax.lax.stop_gradient(positive_logit > jnp.max(others, axis=1)))
    return jnp.sum(ce), hits


def moco_v3_loss(q_a, q_b, k_a, k_b, *, temperature=0.2, axis_name=None):
    """MoCo v3 loss of the global batch from this shard's rows.

    Args:
      q_a, q_b: online queries (predictor outputs) of views a and b, ``[n_local, d]``.
      k_a, k_b: momentum-encoder keys of views a and b, ``[n_local, d]`` (no gradient).
      temperature: softmax temperature T (MoCo v3: 0.2 for ViT; the official
        ResNet default is 1.0).
      axis_name: the named data axis under shard_map/pmap; None on one device.
    Returns:
      ``(loss, metrics)`` with ``metrics = {'accuracy'}``, both global.
    """
    check_embedding_pair(q_a, q_b)
    check_embedding_pair(k_a, k_b)
    check_positive("temperature", temperature)
    if q_a.shape != k_a.shape:
        raise ValueError(f"queries {q_a.shape} and keys {k_a.shape} must have the same shape; set "
                         "config.predictor so the predictor outputs the projector's out_dim.")
    n_global = col.global_batch_size(q_a.shape[0], axis_name)
    ce_ab, hits_ab = _contrast(q_a, k_b, temperature, axis_name)
    ce_ba, hits_ba = _contrast(q_b, k_a, temperature, axis_name)
    loss = 2.0 * temperature * col.psum(ce_ab + ce_ba, axis_name) / n_global
    accuracy = col.psum(hits_ab + hits_ba, axis_name) / (2 * n_global)
    return loss, {"accuracy": accuracy}
