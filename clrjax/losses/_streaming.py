"""Column streaming shared by the softmax-over-the-batch losses (SimCLR, SupCon).

Those losses score this shard's anchor rows against all 2N gathered columns.
Dense, that is one [2n, 2N] block; streamed, the columns go through in
blocks of ``chunk_size`` inside a ``lax.scan`` whose body is rematerialised
(``jax.checkpoint``), each block's row statistics merged into the running
ones with an online log-sum-exp, so forward and backward temporaries are
O(n * chunk_size) instead of O(n * N).
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

# Masked logits get a large finite value, not -inf: a block whose entries are
# all masked for a row then has finite statistics that the online merge scales to zero.
MASKED = -1e30


def check_chunk_size(chunk_size) -> None:
    """None, or a positive int (bool is an int subclass: chunk_size=True is a mistake, not 1)."""
    if chunk_size is not None and (
            isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be None or a positive int, got {chunk_size!r}; pass e.g. 4096."
        )


def masked_logsumexp_terms(logits, in_denominator) -> Tuple[jax.Array, jax.Array]:
    """(shift, sum exp(logit - shift)) of each row over its denominator entries.

    The shift only guards exp() against overflow; the value does not depend on
    it, so it is a constant for autodiff (exact softmax gradients).
    """
    masked = jnp.where(in_denominator, logits, MASKED)
    shift = jax.lax.stop_gradient(jnp.max(masked, axis=1))
    return shift, jnp.sum(jnp.exp(masked - shift[:, None]), axis=1)


def merge_logsumexp(shift_a, sumexp_a, shift_b, sumexp_b) -> Tuple[jax.Array, jax.Array]:
    """Online log-sum-exp merge of two blocks' (shift, sumexp)."""
    shift = jnp.maximum(shift_a, shift_b)
    return shift, sumexp_a * jnp.exp(shift_a - shift) + sumexp_b * jnp.exp(shift_b - shift)


def stream_columns(stats_of: Callable[[Any, jax.Array], Any], merge: Callable[[Any, Any], Any],
                   columns: Any, chunk_size: int) -> Any:
    """``stats_of(block, block_ids)`` over the columns, ``chunk_size`` at a time, merged.

    ``columns`` is a pytree of arrays with the column axis first. They are
    zero-padded to a multiple of chunk_size; ``block_ids`` are the global
    column indices, so ``block_ids >= n_columns`` marks padding to mask.
    """
    n_columns = jax.tree.leaves(columns)[0].shape[0]
    n_blocks = -(-n_columns // chunk_size)
    pad = n_blocks * chunk_size - n_columns

    def blocked(x):
        padded = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return padded.reshape((n_blocks, chunk_size) + x.shape[1:])

    blocks = jax.tree.map(blocked, columns)
    block_ids = jnp.arange(n_blocks * chunk_size).reshape(n_blocks, chunk_size)
    first = stats_of(jax.tree.map(lambda x: x[0], blocks), block_ids[0])

    @jax.checkpoint
    def body(carry, xs):
        block, ids = xs
        return merge(carry, stats_of(block, ids)), None

    stats, _ = jax.lax.scan(body, first, (jax.tree.map(lambda x: x[1:], blocks), block_ids[1:]))
    return stats
