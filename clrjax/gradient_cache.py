"""Gradient caching: the exact gradient of a global-batch loss, computed in micro-batches.

A contrastive loss couples every example of the batch with every other one
(the negatives), so ordinary gradient accumulation over small batches changes
the loss. Gradient caching (Gao, Zhang, Han & Callan 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup", sec. 3.2-3.3)
splits the *network* into micro-batches but keeps the *loss* global. With
``f_theta`` the networks (per example) and ``L`` the loss of all outputs
``u = f_theta(x_1..x_B)``:

    dL/dtheta = sum_j (du_j/dtheta)^T dL/du_j                     (chain rule)

so, for micro-batches ``M_1..M_K`` of the batch:

  1. forward every micro-batch without keeping activations -> ``u`` (all B rows);
  2. ``g = dL/du`` once, on the full batch (the loss's own named-axis
     collectives see every example: the global-batch loss, unchanged);
  3. for each micro-batch, recompute its forward pass and pull ``g[M_k]``
     back through it (``jax.vjp``), summing the parameter gradients.

Steps 1 and 3 run in ``lax.scan`` so the compiled program does not grow with
K; peak activation memory is that of one micro-batch. Step 3 recomputes one
forward pass: the cost of caching is about one extra forward per step.

Exactness: when ``f_theta`` treats examples independently the result equals
the full-batch gradient up to float32 summation order
(``tests/test_gradient_cache.py``). A network with cross-example statistics
(BatchNorm in training mode) is different: each micro-batch normalises with
*its own* statistics, in step 1 and in step 3 alike. The gradient is then the
exact gradient of that "ghost BatchNorm" objective (Hoffer et al. 2017), not
of the global-BatchNorm one; the trainer warns when this is the case. Using
step 1's global statistics as constants in step 3 would not make it exact
either: the true gradient also flows through the statistics into every
example of the batch, layer by layer, which needs one more pass per layer.

Micro-batch ``k`` holds the examples ``k, k + K, k + 2K, ...`` of the global
batch: its content does not depend on the number of devices (each device
holds ``micro_batch_size / D`` of them, from its own rows, with no
communication), so even the ghost-BatchNorm objective is device-invariant.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clrjax.parallel import DATA_AXIS


def split(tree: Any, num_micro: int, mesh: Mesh | None = None) -> Any:
    """[B, ...] leaves -> [K, B/K, ...]: micro-batch k holds rows k, k + K, ... of the batch.

    With a ``mesh``, the rows of every micro-batch stay sharded over its
    batch axis (a device's rows of micro-batch k are among its own rows, so
    the split moves no data between devices).
    """
    def one(x):
        y = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
        return _constrain(y, mesh, P(None, DATA_AXIS))
    return jax.tree.map(one, tree)


def merge(tree: Any, mesh: Mesh | None = None) -> Any:
    """The inverse of :func:`split`: [K, B/K, ...] -> [B, ...] in the batch's order."""
    def one(y):
        x = y.swapaxes(0, 1).reshape((y.shape[0] * y.shape[1],) + y.shape[2:])
        return _constrain(x, mesh, P(DATA_AXIS))
    return jax.tree.map(one, tree)


def take(tree: Any, k: jax.Array, num_micro: int, mesh: Mesh | None = None) -> Any:
    """Micro-batch ``k`` of :func:`split` (rows k, k + K, ...), read in place.

    [B, ...] is viewed as [B/K, K, ...] (a free reshape, whose first axis keeps
    each device's own rows) and column k is sliced out, so the whole batch is
    never copied into the [K, B/K, ...] layout (for uint8 ImageNet images at
    131,072 examples on 8 devices that copy alone was 24 GiB per device).
    """
    def one(x):
        rows = _constrain(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), mesh, P(DATA_AXIS))
        return _constrain(jax.lax.dynamic_index_in_dim(rows, k, axis=1, keepdims=False), mesh, P(DATA_AXIS))
    return jax.tree.map(one, tree)


def _constrain(x, mesh, spec):
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def value_and_grad(forward: Callable, head: Callable, params: Any, inputs: Any, num_micro: int, *,
                   mesh: Mesh | None = None) -> Tuple[Tuple[Any, Any], Any, Any]:
    """The cached equivalent of ``jax.value_and_grad(lambda p: head(forward(p, inputs)[0]), has_aux=True)``.

    Args:
      forward: ``(params, micro_inputs) -> (outputs, extra)``, per-example
        networks on one micro-batch; ``outputs`` is the pytree the loss reads
        (leading axis the micro-batch), ``extra`` anything else the forward
        produces (e.g. new BatchNorm running statistics), returned stacked.
      head: ``outputs of the whole batch -> (loss, aux)``: the global-batch
        loss (it may use the mesh's collectives).
      params: what the gradient is taken with respect to.
      inputs: per-example inputs, leading axis the global batch B.
      num_micro: K, which must divide B (and B/K the device count).
      mesh: the device mesh whose batch axis ``inputs`` are sharded over (None: one device).
    Returns:
      ``((loss, aux), grads, extras)``; ``extras`` has a leading axis K.
    """
    ks = jnp.arange(num_micro)

    def forward_only(_, k):
        return None, forward(params, take(inputs, k, num_micro, mesh))

    _, (outputs, extras) = jax.lax.scan(forward_only, None, ks)
    (loss, aux), output_grads = jax.value_and_grad(head, has_aux=True)(merge(outputs, mesh))
    micro_grads = split(output_grads, num_micro, mesh)

    def pull_back(total, xs):
        k, cotangent = xs
        micro_inputs = take(inputs, k, num_micro, mesh)
        _, vjp = jax.vjp(lambda p: forward(p, micro_inputs)[0], params)
        (grads,) = vjp(cotangent)
        return jax.tree.map(jnp.add, total, grads), None

    grads, _ = jax.lax.scan(pull_back, jax.tree.map(jnp.zeros_like, params), (ks, micro_grads))
    return (loss, aux), grads, extras


def has_batch_statistics(batch_stats: Any) -> bool:
    """Whether a network keeps BatchNorm running statistics (so caching changes its objective)."""
    return bool(jax.tree.leaves(batch_stats))
