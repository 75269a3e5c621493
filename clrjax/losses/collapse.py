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

The singular values come from the R factors of a tall-skinny QR, never from
an SVD of the [N, d] batch: LAPACK's gesdd behind ``jnp.linalg.svd`` on the
CPU allocates an [N, N] buffer even with ``compute_uv=False`` (65 GiB per
device at N = 132,608: measured in the compiled train step's buffer
assignment). With Z = QR per shard, Z^T Z = sum_s R_s^T R_s, so the stacked
R factors have Z's singular values, and QR is backward stable (Golub & Van
Loan, Matrix Computations, 4th ed., sec. 5.2), so they are as accurate as an
SVD of Z itself. Memory: O(n_local d + D d^2) per device.
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

    The gather is under stop_gradient so it adds no backward communication.
    """
    sigma = global_singular_values(z, axis_name)
    p = sigma / jnp.maximum(jnp.sum(sigma), 1e-30) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def _r_factor(z: jax.Array) -> jax.Array:
    """R of z = QR when z is taller than wide (same singular values, d rows); z itself otherwise."""
    return jnp.linalg.qr(z, mode="r") if z.shape[0] > z.shape[1] else z


def global_singular_values(z: jax.Array, axis_name=None) -> jax.Array:
    """Singular values of the global [N, d] matrix (shards in axis order), descending.

    Each shard reduces its rows to a d x d R factor, the factors are gathered
    (at most D d x d, not N x d) and reduced once more; see the module docstring.
    """
    local = _r_factor(jax.lax.stop_gradient(z).astype(jnp.float32))
    stacked = _r_factor(col.all_gather_constant(local, axis_name))
    return jnp.linalg.svd(stacked, compute_uv=False)


def collapse_metrics(z: jax.Array, axis_name=None) -> dict:
    """{'embedding_std', 'rankme'} of one view's embeddings (the losses pass view a)."""
    return {"embedding_std": embedding_std(z, axis_name), "rankme": rankme(z, axis_name)}
