"""Barlow Twins loss, exact on any device count.

Math (Zbontar et al. 2021, "Barlow Twins", eq. 1-2; official code
``facebookresearch/barlowtwins/main.py``, which standardises with a
non-affine BatchNorm, i.e. biased variance and eps inside the sqrt):

    zh = (z - mean_N(z)) / sqrt(var_N(z) + eps)        per view, per dimension
    C  = zh_a^T zh_b / N                                [d, d]
    loss = sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2

Two parallel layouts with identical results (``impl``):
  replicated    each shard forms its local [d, d] contribution zh_a^T zh_b and
                psums the whole matrix; best for small d.
  column_split  shard r gathers zh_a [N, d], receives columns r*d/K:(r+1)*d/K of
                zh_b by all-to-all [N, d/K], forms C[:, cols_r] and psums only
                the two scalars. Per-device memory and the all-reduce drop
                from O(d^2) to O(N d + d^2 / K); the matmul FLOPs per device are
                the same N d^2 / K in both layouts.

Metrics: on_diagonal = sum_i (1 - C_ii)^2, off_diagonal = sum_{i != j} C_ij^2
(unweighted, loss = on_diagonal + lambd * off_diagonal), and the collapse
monitors of view a.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses import collapse
from clrjax.losses._normalize import batch_mean, centered_sum_squares
from clrjax.losses._validation import check_embedding_pair, check_positive, resolve_impl


def standardize(z: jax.Array, eps: float, axis_name) -> jax.Array:
    """(z - mean) / sqrt(biased var + eps) per dimension over the global batch."""
    n_global = z.shape[0] * col.axis_size(axis_name)
    mean = batch_mean(z, axis_name)
    var = centered_sum_squares(z, mean, axis_name) / n_global
    return (z - mean) * jax.lax.rsqrt(var + eps)


def _terms_replicated(z_a, z_b, eps, axis_name):
    n_global = z_a.shape[0] * col.axis_size(axis_name)
    c = col.psum(standardize(z_a, eps, axis_name).T @ standardize(z_b, eps, axis_name),
                 axis_name) / n_global
    return _diagonal_terms(c, jnp.eye(c.shape[0], dtype=bool))


def _terms_column_split(z_a, z_b, eps, axis_name):
    zh_a = standardize(col.all_gather(z_a, axis_name), eps, None)  # [N, d]
    zh_b_cols = standardize(col.all_to_all_columns(z_b, axis_name), eps, None)  # [N, d/K]
    n_global, d_local = zh_b_cols.shape
    c_cols = zh_a.T @ zh_b_cols / n_global  # [d, d/K] = C[:, cols_r]
    first_col = col.axis_index(axis_name) * d_local
    is_diag = jnp.arange(c_cols.shape[0])[:, None] == first_col + jnp.arange(d_local)[None, :]
    on, off = _diagonal_terms(c_cols, is_diag)
    return col.psum(on, axis_name), col.psum(off, axis_name)


def _diagonal_terms(c, is_diag):
    """(sum over diagonal entries of (1 - c)^2, sum over off-diagonal entries of c^2)."""
    on = jnp.sum(jnp.where(is_diag, jnp.square(1.0 - c), 0.0))
    off = jnp.sum(jnp.where(is_diag, 0.0, jnp.square(c)))
    return on, off


def barlow_twins_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    *,
    lambd: float = 0.0051,
    eps: float = 1e-5,
    impl: str = "auto",
    axis_name=None,
    monitors: bool = True,
):
    """Barlow Twins loss of the global batch from this shard's [n_local, d] rows.

    Args:
      z_a, z_b: [n_local, d] projector outputs (math in float32).
      lambd: weight of the off-diagonal (redundancy) term.
      eps: added to the variance before the sqrt (keeps constant dims finite).
      impl: 'auto' | 'replicated' | 'column_split' (see module docstring).
      axis_name: mapped axis name, or None on one device.
      monitors: also compute the collapse monitors.

    Returns:
      (loss, metrics), global scalars identical on every shard.
    """
    check_embedding_pair(z_a, z_b)
    check_positive("eps", eps)
    z_a32, z_b32 = z_a.astype(jnp.float32), z_b.astype(jnp.float32)
    layout = resolve_impl(impl, z_a.shape[1], col.axis_size(axis_name), axis_name)
    if layout == "column_split":
        on, off = _terms_column_split(z_a32, z_b32, eps, axis_name)
    else:
        on, off = _terms_replicated(z_a32, z_b32, eps, axis_name)
    loss = on + lambd * off
    metrics = {"on_diagonal": jax.lax.stop_gradient(on), "off_diagonal": jax.lax.stop_gradient(off)}
    if monitors:
        metrics.update(collapse.collapse_metrics(z_a, axis_name))
    return loss, metrics
