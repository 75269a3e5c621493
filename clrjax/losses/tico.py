"""TiCo (Transformation Invariance and Covariance Contrast) loss.

Math (Zhu et al. 2022, "TiCo: Transformation Invariance and Covariance
Contrast for Self-Supervised Visual Representation Learning", Sec. 3 and
its Algorithm 1 PyTorch pseudocode):

    u       = z / ||z||                       per row, both views
    B       = u_a^T u_a / N                   [d, d], global batch
    new_cov = beta * cov + (1 - beta) * B     constant for autodiff (stop_gradient)
    loss    = 1 - mean_i (u_a,i . u_b,i) + rho * mean_i (u_a,i^T new_cov u_a,i)

``cov`` is method state ([d, d] float32, zeros at step 0) carried by the train
state; the function returns the updated ``new_cov``, whole and identical on
every shard.

Layout. The quadratic term's gradient, 2 new_cov u_a,i / N, only touches the
local rows, so it is always computed from local rows (n d^2 FLOPs, no
communication). Only B needs the global batch, and because new_cov is a
constant, B is built from stop_gradient(u_a): no backward communication.
  replicated    local u_a^T u_a, psum of the [d, d] matrix (all-reduce ~2 d^2
                per device).
  column_split  gather stop_gradient(u_a) [N, d] (N d), form the row block
                B[rows_r, :] [d/K, d], all_gather the blocks (~d^2). Same FLOPs
                (N d^2 / K per device); about half the communication when N << d,
                and every shard's new_cov is bit-identical by construction.

Metrics: invariance = 1 - mean cos(u_a, u_b), covariance = mean_i u_a,i^T
new_cov u_a,i (loss = invariance + rho * covariance), and the collapse
monitors of view a.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses import collapse
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._validation import (
    check_embedding_pair,
    check_positive,
    check_unit_interval,
    resolve_impl,
)


def _batch_second_moment(u, layout, axis_name):
    """B = u^T u / N over the global batch, whole on every shard, [d, d]."""
    n_global = u.shape[0] * col.axis_size(axis_name)
    if layout == "replicated":
        return col.psum(u.T @ u, axis_name) / n_global
    u_all = col.all_gather(u, axis_name)
    d_local = u.shape[1] // col.axis_size(axis_name)
    u_rows = jax.lax.dynamic_slice_in_dim(u_all, col.axis_index(axis_name) * d_local, d_local, axis=1)
    # new_cov is a constant (stop-gradient), so the invariant gather is exact.
    return col.all_gather_constant(u_rows.T @ u_all / n_global, axis_name)  # rows of B, concatenated


def _check_cov(cov, dim) -> None:
    if getattr(cov, "shape", None) != (dim, dim):
        raise ValueError(
            f"cov must have shape ({dim}, {dim}) to match the embedding dim {dim}, got "
            f"{getattr(cov, 'shape', type(cov))}; start from zeros of that shape "
            "(what clrjax.methods.get('tico').init_state(config, variables) gives)."
        )


def tico_loss(
    z_a: jax.Array,
    z_b: jax.Array,
    cov: jax.Array,
    *,
    beta: float = 0.9,
    rho: float = 8.0,
    impl: str = "auto",
    axis_name=None,
    monitors: bool = True,
):
    """TiCo loss of the global batch from this shard's [n_local, d] rows.

    Args:
      z_a, z_b: [n_local, d] projector outputs (math in float32).
      cov: [d, d] running covariance (replicated state).
      beta: EMA decay of the covariance, in [0, 1).
      rho: weight of the covariance-contrast term.
      impl: 'auto' | 'replicated' | 'column_split' (see module docstring).
      axis_name: mapped axis name, or None on one device.
      monitors: also compute the collapse monitors.

    Returns:
      (loss, new_cov, metrics): new_cov [d, d] float32, identical on every shard.
    """
    check_embedding_pair(z_a, z_b)
    dim = z_a.shape[1]
    _check_cov(cov, dim)
    check_unit_interval("beta", beta)
    n_global = col.global_batch_size(z_a.shape[0], axis_name)
    u_a = l2_normalize(z_a.astype(jnp.float32))
    u_b = l2_normalize(z_b.astype(jnp.float32))

    layout = resolve_impl(impl, dim, col.axis_size(axis_name), axis_name)
    batch_cov = _batch_second_moment(jax.lax.stop_gradient(u_a), layout, axis_name)
    new_cov = jax.lax.stop_gradient(beta * cov.astype(jnp.float32) + (1.0 - beta) * batch_cov)

    invariance = 1.0 - col.psum(jnp.sum(u_a * u_b), axis_name) / n_global
    covariance = col.psum(jnp.sum((u_a @ new_cov) * u_a), axis_name) / n_global
    loss = invariance + rho * covariance
    metrics = {"invariance": jax.lax.stop_gradient(invariance),
               "covariance": jax.lax.stop_gradient(covariance)}
    if monitors:
        metrics.update(collapse.collapse_metrics(z_a, axis_name))
    return loss, new_cov, metrics
