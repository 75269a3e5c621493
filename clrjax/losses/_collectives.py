"""Named-axis collectives that also accept ``axis_name=None`` (one device).

Every loss in :mod:`clrjax.losses` is written per shard: it sees the local rows
of the global batch and calls these helpers exactly where the mathematics needs
the global batch. With ``axis_name=None`` each helper is the identity (or the
one-device constant), so the same function is the ordinary one-device loss.
Under ``jax.shard_map`` or ``jax.pmap`` over an axis of N devices the helpers
are the JAX collectives, and the global batch is the concatenation of the
shards in ``axis_index`` order.

Why ``all_gather`` keeps its gradient: ``jax.lax.all_gather`` transposes to a
``psum_scatter``, so the gradient flowing into the gathered copy from every
device's loss comes back to the rows that device owns. That is what makes the
per-shard gradient equal the one-device gradient without manual rescaling
(the bug class of "an all-reduce with no backward pass").
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

AxisName = Optional[str]


def all_gather(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Concatenates the shards of ``x`` along axis 0 in axis-index order."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def _all_gather_invariant_primitive():
    """``all_gather_invariant``: public in newer JAX, private in 0.10."""
    public = getattr(jax.lax, "all_gather_invariant", None)
    if public is not None:
        return public
    from jax._src.lax import parallel as _parallel  # jax 0.10: not yet exported
    return getattr(_parallel, "all_gather_invariant", None)


def all_gather_constant(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """``all_gather`` of a value that needs no gradient, typed as replicated.

    ``lax.all_gather`` output counts as device-varying under shard_map's
    replication check (its transpose must scatter gradients back), so a
    gathered result cannot be returned with ``out_specs=P()``. For
    stop-gradient data (TiCo's covariance blocks, monitors) the invariant
    gather is exact and provably replicated.
    """
    if axis_name is None:
        return x
    x = jax.lax.stop_gradient(x)
    gather = _all_gather_invariant_primitive()
    if gather is None:  # very old/new JAX without it: an exact, costlier equivalent
        return pmean(jax.lax.all_gather(x, axis_name, axis=0, tiled=True), axis_name)
    return gather(x, axis_name, axis=0, tiled=True)


def constant_varying(x, axis_name: AxisName):
    """Types a replicated constant ``x`` as device-varying over the axis.

    A ``lax.scan`` carry must keep its type; a constant initial carry (zeros)
    is replicated while the body's output varies per device, so shard_map's
    replication check needs the cast. Under pmap it changes nothing; on one
    device it is the identity. Only for values built as constants inside the
    mapped function: pcast refuses a value that already varies.
    """
    if axis_name is None:
        return x
    return jax.lax.pcast(x, axis_name, to="varying")


def psum(x, axis_name: AxisName):
    """Sums a pytree over the axis (identity on one device)."""
    if axis_name is None:
        return x
    return jax.lax.psum(x, axis_name)


def pmean(x, axis_name: AxisName):
    """Averages a pytree over the axis (identity on one device)."""
    if axis_name is None:
        return x
    return jax.lax.pmean(x, axis_name)


def axis_index(axis_name: AxisName) -> jax.Array:
    """This shard's position along the axis (0 on one device)."""
    if axis_name is None:
        return jnp.zeros((), jnp.int32)
    return jax.lax.axis_index(axis_name)


def axis_size(axis_name: AxisName) -> int:
    """Number of shards along the axis (1 on one device); a static Python int."""
    if axis_name is None:
        return 1
    return jax.lax.axis_size(axis_name)


def global_batch_size(n_local: int, axis_name: AxisName) -> int:
    """N, the global batch size, assuming equal shards (static)."""
    return n_local * axis_size(axis_name)


def all_to_all_columns(x: jax.Array, axis_name: AxisName) -> jax.Array:
    """Turns row shards ``[n_local, d]`` into column shards ``[N, d / K]``.

    Shard k receives columns ``k*d/K : (k+1)*d/K`` of the global batch (rows in
    axis-index order). Requires ``d`` divisible by the axis size K. Its
    transpose is again an all-to-all, so gradients reach the owning rows.
    """
    if axis_name is None:
        return x
    return jax.lax.all_to_all(x, axis_name, split_axis=1, concat_axis=0, tiled=True)
