"""Collapse monitors reported by every method (never differentiated).

Both take the local shard ``z`` [n_local, d] and return the same scalar on every
shard, computed on the global batch (concatenation of shards in axis order).
Inputs are wrapped in ``stop_gradient`` so adding a monitor never changes a
gradient.

* ``embedding_std``: mean over dimensions of the per-dimension standard
  deviation (population, ddof=0) of the L2-normalised embeddings. A collapsed
  representation gives 0; for isotropic unit vectors it is about 1/sqrt(d)
  (SimSiam, Chen & He 2021, Sec. 4.1).
* ``rankme``: RankMe effective rank (Garrido et al. 2023, eq. 1):
  p_k = sigma_k / ||sigma||_1 + eps, RankMe = exp(-sum_k p_k log p_k), where
  sigma are the singular values of the global [N, d] embedding matrix and
  eps = 1e-7 as in the paper. Ranges over [1, min(N, d)].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._normalize import batch_mean, centered_sum_squares, l2_normalize

RANKME_EPS = 1e-7


def embedding_std(z: jax.Array, axis_name=None) -> jax.Array:
    """Mean per-dimension std (ddof=0) of L2-normalised z over the global batch."""
    u = l2_normalize(jax.lax.stop_gradient(z).astype(jnp.float32))
    n_global = z.shape[0] * col.axis_size(axis_name)
    var = centered_sum_squares(u, batch_mean(u, axis_name), axis_name) / n_global
    return jnp.mean(jnp.sqrt(var))


def rankme(z: jax.Array, axis_name=None, eps: float = RANKME_EPS) -> jax.Array:
    """RankMe effective rank of the global embedding matrix (Garrido et al. 2023).

    Every shard gathers the [N, d] matrix and takes its singular values; the
    gather is under stop_gradient so it adds no backward communication.
    """
    z_all = col.all_gather_constant(z.astype(jnp.float32), axis_name)
    sigma = jnp.linalg.svd(z_all, compute_uv=False)
    p = sigma / jnp.maximum(jnp.sum(sigma), 1e-30) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def collapse_metrics(z: jax.Array, axis_name=None) -> dict:
    """{'embedding_std', 'rankme'} of one view's embeddings (the losses pass view a)."""
    return {"embedding_std": embedding_std(z, axis_name), "rankme": rankme(z, axis_name)}
