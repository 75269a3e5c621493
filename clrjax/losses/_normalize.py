"""Per-row and per-dimension normalisations of embedding matrices (float32)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col


def l2_normalize(z: jax.Array) -> jax.Array:
    """u = z / max(||z||_2, 1e-12) row-wise, as torch.nn.functional.normalize.

    The floor keeps an all-zero row (and its gradient) finite.
    """
    sq = jnp.sum(z * z, axis=-1, keepdims=True)
    return z * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def batch_mean(z: jax.Array, axis_name) -> jax.Array:
    """Per-dimension mean over the global batch, [d]."""
    n_global = z.shape[0] * col.axis_size(axis_name)
    return col.psum(jnp.sum(z, axis=0), axis_name) / n_global


def centered_sum_squares(z: jax.Array, mean: jax.Array, axis_name) -> jax.Array:
    """Per-dimension sum over the global batch of (z - mean)^2, [d].

    Two-pass (centre, then square) rather than E[z^2] - E[z]^2, which cancels
    catastrophically in float32 for dimensions with a large mean.
    """
    return col.psum(jnp.sum(jnp.square(z - mean), axis=0), axis_name)
