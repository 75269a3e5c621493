"""SigLIP's pairwise sigmoid image-text loss, exact on any device count.

Math (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1
and Algorithm 1):

    u_i = img_i / ||img_i||,   v_j = txt_j / ||txt_j||,   t = exp(log_t),
    z_ij = 1 if i == j else -1,
    loss = -(1/N) sum_{i=1..N} sum_{j=1..N} log sigmoid( z_ij (t u_i . v_j + b) ),

normalised by the global batch N (the 1/|B| of eq. 1; Algorithm 1 divides by
n). Learnable t' = log_t and b, initialised at log 10 and -10 (Sec. 3.2,
:data:`INIT_LOG_T`, :data:`INIT_BIAS`); the paper clips neither here. log sigmoid
is computed as -softplus(-x), finite for any logit.

Parallel layout, impl='ppermute' (the paper's "chunked" implementation,
Sec. 3.3 and its Figure 1): shard r keeps its n images and starts with its own
n texts. It scores the n x n block of its own pairs (the only block with
positives, on the diagonal), then the text blocks travel one device round the
ring with ``jax.lax.ppermute`` (r sends to r + 1), K - 1 hops, and after hop h
shard r scores its images against the texts of shard r - h, all negatives.
All K blocks go through one ``lax.scan`` body, rematerialised
(``jax.checkpoint``), so no device ever holds more than one n x n block of
logits, forward or backward; the backward pass saves only the K incoming
[n, d] text blocks and sends the text gradients back round the ring, because
JAX transposes a ppermute into the inverse ppermute. The per-shard sums are
psum-ed at the end.

impl='all_gather' is the dense alternative (one all-gather of the texts, one
[n, N] block per shard); it exists to measure the memory the ring saves
(``python -m clrjax.losses.memory_report``) and as a cross-check. Both give the
same loss and gradients; with ``axis_name=None`` both are the one-block loss.

Metrics (global, identical on every shard, under stop_gradient):
  i2t_accuracy, t2i_accuracy  fraction of the N images (texts) whose own
                              caption (image) scores strictly above every other
                              one in the global batch.
  positive_logit, negative_logit  mean of t u_i . v_j + b over the N pairs and
                              over the N (N - 1) non-pairs (for N = 1: b).
  t, bias                     exp(log_t) and b.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.losses._normalize import l2_normalize
from clrjax.losses._streaming import MASKED
from clrjax.losses._validation import check_image_text_pair, check_scalar

INIT_LOG_T = math.log(10.0)  # Sec. 3.2: t' = log 10
INIT_BIAS = -10.0  # Sec. 3.2: b = -10
IMPLS = ("ppermute", "all_gather")


class _TextBlock(NamedTuple):
    """A block of n texts travelling round the ring, with what its metrics need."""

    txt: jax.Array  # [n, d] unit vectors
    positive_logit: jax.Array  # [n] t v_j . u_j + b of its own pairs (stop_gradient)
    max_negative: jax.Array  # [n] best wrong image seen so far, per text (stop_gradient)


class _Totals(NamedTuple):
    """This shard's running sums over the blocks it has scored."""

    loss_sum: jax.Array  # sum_i sum_j -log sigmoid(z_ij logit_ij) over scored blocks
    max_negative: jax.Array  # [n] best wrong caption so far, per image (stop_gradient)


def _score_block(img, block: _TextBlock, totals: _Totals, t, bias, own: jax.Array):
    """Adds the n x n block of ``img`` [n, d] against ``block``'s texts to the totals.

    ``own`` (a traced bool, the same on every device) marks the block of this
    shard's own pairs, the only one with positives (on its diagonal).
    """
    logits = t * (img @ block.txt.T) + bias  # [n, n]
    is_pair = jnp.eye(logits.shape[0], dtype=bool) & own
    z = jnp.where(is_pair, 1.0, -1.0)
    frozen = jnp.where(is_pair, MASKED, jax.lax.stop_gradient(logits))
    totals = _Totals(totals.loss_sum + jnp.sum(jax.nn.softplus(-z * logits)),  # -log sigmoid(z x)
                     jnp.maximum(totals.max_negative, jnp.max(frozen, axis=1)))
    block = block._replace(max_negative=jnp.maximum(block.max_negative, jnp.max(frozen, axis=0)))
    return block, totals


def _ring(img, txt, t, bias, axis_name):
    """K blocks: the own one, then K - 1 text blocks arriving by ppermute."""
    k = col.axis_size(axis_name)
    n = img.shape[0]
    low = col.constant_varying(jnp.full((n,), MASKED, jnp.float32), axis_name if k > 1 else None)
    zero = col.constant_varying(jnp.zeros((), jnp.float32), axis_name if k > 1 else None)
    block = _TextBlock(txt, jax.lax.stop_gradient(t * jnp.sum(img * txt, axis=1) + bias), low)
    totals = _Totals(zero, low)
    if k == 1:
        return _score_block(img, block, totals, t, bias, jnp.bool_(True))
    send_to_next = [(r, (r + 1) % k) for r in range(k)]

    def pass_on(b):
        return jax.tree.map(lambda x: jax.lax.ppermute(x, axis_name, send_to_next), b)

    # One scan body for all K blocks: a block scored outside the loop would get
    # buffers of its own (measured: 452 MiB of temporaries instead of 340 at
    # N=32,768, d=768, K=8). Rematerialised, so only the carry is saved per hop.
    @jax.checkpoint
    def hop(carry, h):
        block, totals = _score_block(img, *carry, t, bias, h == 0)
        # The last block needs no further hop: K - 1 ppermutes in all. h is the
        # same on every device, so all take the same branch.
        block = jax.lax.cond(h < k - 1, pass_on, lambda b: b, block)
        return (block, totals), None

    (block, totals), _ = jax.lax.scan(hop, (block, totals), jnp.arange(k))
    return block, totals


def _gathered(img, txt, t, bias, axis_name):
    """Dense variant: all N texts gathered, one [n, N] block (for comparison)."""
    n_local = img.shape[0]
    txt_all = col.all_gather(txt, axis_name)
    logits = t * (img @ txt_all.T) + bias  # [n, N]
    ids = col.axis_index(axis_name) * n_local + jnp.arange(n_local)
    is_pair = jnp.arange(txt_all.shape[0])[None, :] == ids[:, None]
    z = jnp.where(is_pair, 1.0, -1.0)
    frozen = jnp.where(is_pair, MASKED, jax.lax.stop_gradient(logits))
    positive_logit = jax.lax.stop_gradient(t * jnp.sum(img * txt, axis=1) + bias)
    # Column maxima of the other shards' rows arrive by pmax; each shard then
    # holds the metric inputs of its own texts, as the ring does.
    column_max = jnp.max(frozen, axis=0)
    if axis_name is not None:
        column_max = jax.lax.pmax(column_max, axis_name)
    own_columns = jax.lax.dynamic_slice_in_dim(column_max, ids[0], n_local)
    block = _TextBlock(txt, positive_logit, own_columns)
    totals = _Totals(jnp.sum(jax.nn.softplus(-z * logits)), jnp.max(frozen, axis=1))
    return block, totals


def siglip_loss(img: jax.Array, txt: jax.Array, log_t, bias, *, axis_name=None,
                impl: str = "ppermute"):
    """SigLIP's sigmoid loss of the global batch, computed from this shard's pairs.

    Args:
      img, txt: [n_local, d] image- and text-tower outputs (any float dtype; the
        math runs in float32, L2-normalised inside). Row i of both is one pair.
      log_t: scalar, log of the logit multiplier t (raw learnable parameter,
        init :data:`INIT_LOG_T` = log 10).
      bias: scalar learnable bias b (init :data:`INIT_BIAS` = -10).
      axis_name: the mapped axis of shard_map/pmap, or None on one device.
      impl: 'ppermute' (text blocks round the ring, n x n blocks; the default)
        or 'all_gather' (one [n, N] block, more memory).

    Returns:
      (loss, metrics): loss is eq. 1 over the N global pairs (the same scalar
      on every shard); metrics is a dict of global scalars.
    """
    check_image_text_pair(img, txt)
    check_scalar("log_t", log_t)
    check_scalar("bias", bias)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}; use 'ppermute' unless "
                         "measuring memory.")
    n_global = col.global_batch_size(img.shape[0], axis_name)

    u = l2_normalize(img.astype(jnp.float32))
    v = l2_normalize(txt.astype(jnp.float32))
    t = jnp.exp(jnp.asarray(log_t, jnp.float32))
    bias = jnp.asarray(bias, jnp.float32)
    blocks = _ring if impl == "ppermute" else _gathered
    block, totals = blocks(u, v, t, bias, axis_name)

    loss = col.psum(totals.loss_sum, axis_name) / n_global
    metrics = _metrics(u, v, t, bias, block, totals, n_global, axis_name)
    return loss, metrics


def _metrics(u, v, t, bias, block: _TextBlock, totals: _Totals, n_global, axis_name) -> dict:
    u, v, t, bias = (jax.lax.stop_gradient(x) for x in (u, v, t, bias))
    pair_sim = jnp.sum(u * v, axis=1)
    positive_logit = t * pair_sim + bias
    sums = col.psum(jnp.stack([
        jnp.sum((positive_logit > totals.max_negative).astype(jnp.float32)),
        jnp.sum((block.positive_logit > block.max_negative).astype(jnp.float32)),
        jnp.sum(pair_sim),
    ]), axis_name)
    # sum over all pairs (i, j) of u_i . v_j = (sum_i u_i) . (sum_j v_j): no N x N work.
    all_pairs = jnp.dot(col.psum(jnp.sum(u, axis=0), axis_name),
                        col.psum(jnp.sum(v, axis=0), axis_name))
    n_negative = max(n_global * (n_global - 1), 1)  # Python int: no int32 overflow
    return {
        "i2t_accuracy": sums[0] / n_global,
        "t2i_accuracy": sums[1] / n_global,
        "positive_logit": t * sums[2] / n_global + bias,
        "negative_logit": t * (all_pairs - sums[2]) / n_negative + bias,
        "t": t,
        "bias": bias,
    }
