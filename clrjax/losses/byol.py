"""BYOL's regression loss (Grill et al. 2020), exact on any device count.

Math (Grill et al. 2020, "Bootstrap Your Own Latent", sec. 3.1, eq. 2 and the
symmetrisation below it): with p the online network's predictions and t the
target network's projections of the two views a and b,

    cos(p, t) = p . t / (||p|| ||t||),
    loss = (1 / N) sum_i [ (2 - 2 cos(p_a,i, t_b,i)) + (2 - 2 cos(p_b,i, t_a,i)) ],

the mean over the N images of the global batch of the symmetrised normalised
MSE (||p/||p|| - t/||t|| ||^2 = 2 - 2 cos). The target never receives a
gradient: ``t_a`` and ``t_b`` pass through ``stop_gradient`` here (the
target's parameters change only through the EMA, clrjax.methods.momentum).

Scale: the official code (``byol/byol_experiment.py``, ``loss_fn``) sums the
two views' regression losses and averages over the batch: the same value.

Parallel layout: every term is a row-wise function of one image's rows, so
each shard sums its own rows and the sum is psum-ed over the axis; nothing
is gathered.

Metrics (global, identical on every shard, under stop_gradient):
  cosine   mean over the 2N (prediction, target) pairs of cos(p, t).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._validation import check_embedding_pair


def byol_loss(p_a, p_b, t_a, t_b, *, axis_name=None):
    """BYOL loss of the global batch from this shard's rows.

    Args:
      p_a, p_b: online predictions of views a and b, ``[n_local, d]``.
      t_a, t_b: target projections of views a and b, ``[n_local, d]`` (no
        gradient flows into them).
      axis_name: the named data axis under shard_map/pmap; None on one device.
    Returns:
      ``(loss, metrics)``: the scalar loss and ``{'cosine'}``, both global.
    """
    check_embedding_pair(p_a, p_b)
    check_embedding_pair(t_a, t_b)
    if p_a.shape != t_a.shape:
        raise ValueError(f"predictions {p_a.shape} and target projections {t_a.shape} must have the same "
                         "shape; set config.predictor so the predictor outputs the projector's out_dim.")
    t_a, t_b = jax.lax.stop_gradient(t_a), jax.lax.stop_gradient(t_b)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    cos_ab = jnp.sum(l2_normalize(f32(p_a)) * l2_normalize(f32(t_b)), axis=-1)
    cos_ba = jnp.sum(l2_normalize(f32(p_b)) * l2_normalize(f32(t_a)), axis=-1)
    n = col.global_batch_size(p_a.shape[0], axis_name)
    loss = col.psum(jnp.sum((2.0 - 2.0 * cos_ab) + (2.0 - 2.0 * cos_ba)), axis_name) / n
    cosine = col.psum(jnp.sum(jax.lax.stop_gradient(cos_ab + cos_ba)), axis_name) / (2 * n)
    return loss, {"cosine": cosine}
