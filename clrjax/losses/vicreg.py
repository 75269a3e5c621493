"""VICReg loss, exact on any device count.

Math as in the official code (``facebookresearch/vicreg/main_vicreg.py``,
``VICReg.forward``, which gathers the full batch); the terms are those of
Bardes et al. 2022, "VICReg", eq. 1-6, up to the convention noted below:

    inv      = (1 / (N d)) sum_{i, k} (z_a,ik - z_b,ik)^2              F.mse_loss
    x        = z - mean_N(z),   std = sqrt(unbiased var_N(z) + eps)   per view
    var_term = mean_k relu(1 - std_a,k) / 2 + mean_k relu(1 - std_b,k) / 2
    cov      = x^T x / (N - 1)                                         [d, d]
    cov_term = sum_{i != j} cov_a,ij^2 / d + sum_{i != j} cov_b,ij^2 / d
    loss     = sim_coeff * inv + std_coeff * var_term + cov_coeff * cov_term

Two conventions for the variance weight. The ``/ 2`` in ``var_term`` comes
from the official code; the paper's loss weights ``v(Z) + v(Z')`` by mu with
no halving. clrjax follows the code, so ``std_coeff = 25`` (the code's
default and the paper's stated mu) is, in the paper's terms, mu = 12.5; the
paper's formula at mu = 25 is this loss with ``std_coeff = 50``.

The [d, d] covariance is the only expensive part; ``impl`` chooses its layout:
  replicated    local x^T x contributions, psum of the whole [d, d] matrix.
  column_split  shard r gathers x [N, d] and forms cov[:, cols_r] [d, d/K];
                only the scalar sums of squares are psum-ed.

Metrics: invariance, variance, covariance (the three unweighted terms) and
the collapse monitors of view a.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses import collapse
from clrjax.losses._normalize import batch_mean, centered_sum_squares
from clrjax.losses._validation import (
    check_embedding_pair,
    check_global_batch,
    check_positive,
    resolve_impl,
)


def _off_diagonal_sq_replicated(z, mean, axis_name):
    x = z - mean
    n_global = z.shape[0] * col.axis_size(axis_name)
    cov = col.psum(x.T @ x, axis_name) / (n_global - 1)
    return jnp.sum(jnp.where(jnp.eye(cov.shape[0], dtype=bool), 0.0, jnp.square(cov)))


def _off_diagonal_sq_column_split(z, axis_name):
    x = col.all_gather(z, axis_name)
    x = x - jnp.mean(x, axis=0)
    n_global, dim = x.shape
    d_local = dim // col.axis_size(axis_name)
    first_col = col.axis_index(axis_name) * d_local
    x_cols = jax.lax.dynamic_slice_in_dim(x, first_col, d_local, axis=1)
    cov_cols = x.T @ x_cols / (n_global - 1)  # [d, d/K] = cov[:, cols_r]
    is_diag = jnp.arange(dim)[:, None] == first_col + jnp.arange(d_local)[None, :]
    return col.psum(jnp.sum(jnp.where(is_diag, 0.0, jnp.square(cov_cols))), axis_name)


def _variance_term(z, mean, eps, axis_name):
    n_global = z.shape[0] * col.axis_size(axis_name)
    std = jnp.sqrt(centered_sum_squares(z, mean, axis_name) / (n_global - 1) + eps)
    return jnp.mean(jax.nn.relu(1.0 - std))


def vicreg_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    impl: str = "auto",
    axis_name=None,
    monitors: bool = True,
):
    """VICReg loss of the global batch from this shard's [n_local, d] rows.

    Args:
      z_a, z_b: [n_local, d] projector outputs (math in float32).
      sim_coeff, std_coeff, cov_coeff: term weights (official code and paper: 25, 25, 1);
        ``std_coeff`` multiplies the halved ``var_term`` (module docstring).
      eps: added to the variance before the sqrt.
      impl: 'auto' | 'replicated' | 'column_split' (see module docstring).
      axis_name: mapped axis name, or None on one device.
      monitors: also compute the collapse monitors.

    Returns:
      (loss, metrics), global scalars identical on every shard.
    """
    check_embedding_pair(z_a, z_b)
    check_positive("eps", eps)
    n_local, dim = z_a.shape
    n_global = col.global_batch_size(n_local, axis_name)
    check_global_batch(n_global, 2, "VICReg (unbiased variance)")
    z_a32, z_b32 = z_a.astype(jnp.float32), z_b.astype(jnp.float32)
    mean_a, mean_b = batch_mean(z_a32, axis_name), batch_mean(z_b32, axis_name)

    invariance = col.psum(jnp.sum(jnp.square(z_a32 - z_b32)), axis_name) / (n_global * dim)
    variance = 0.5 * (_variance_term(z_a32, mean_a, eps, axis_name)
                      + _variance_term(z_b32, mean_b, eps, axis_name))
    layout = resolve_impl(impl, dim, col.axis_size(axis_name), axis_name)
    if layout == "column_split":
        off_sq = (_off_diagonal_sq_column_split(z_a32, axis_name)
                  + _off_diagonal_sq_column_split(z_b32, axis_name))
    else:
        off_sq = (_off_diagonal_sq_replicated(z_a32, mean_a, axis_name)
                  + _off_diagonal_sq_replicated(z_b32, mean_b, axis_name))
    covariance = off_sq / dim

    loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    metrics = {name: jax.lax.stop_gradient(v) for name, v in
               (("invariance", invariance), ("variance", variance), ("covariance", covariance))}
    if monitors:
        metrics.update(collapse.collapse_metrics(z_a, axis_name))
    return loss, metrics
