"""Where the train state lives on the mesh: replicated on every device, or sharded (FSDP).

``config.sharding.mode``:
  * ``'replicated'`` (the default): every device holds the whole state
    (parameters, BatchNorm statistics, optimizer and method state), the
    classic data-parallel layout;
  * ``'fsdp'``: every array of at least ``config.sharding.min_size`` elements
    is split over the mesh's ``'data'`` axis along one dimension, so each
    device holds 1/N of it: parameters, their optimizer state (Adam moments,
    LARS/SGD momentum have the parameters' shapes, hence the same sharding),
    and the method state (an EMA target network, MoCo's queue). The batch
    stays sharded over the same axis. This is the layout of ZeRO stage 3
    (Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
    Parameter Models", SC 2020, sec. 5: partitioned optimizer states,
    gradients and parameters) and of FSDP; the code never gathers anything
    itself: the jitted step is given these shardings and XLA's SPMD
    partitioner inserts the all-gather of each weight before its use and the
    reduce-scatter of its gradient.

The rule (:func:`fsdp_spec`) is the one of big_vision's ``fsdp`` sharding
rule (``big_vision/sharding.py``, read, not copied): the largest dimension
divisible by the number of devices. The largest, because it leaves the
smallest shards of the other dimensions intact and is the dimension most
likely to be divisible; on a tie the first such dimension, because a shard of
the leading dimension is one contiguous block of the row-major array (the
host copy a checkpoint writes). Arrays with fewer than ``min_size`` elements
(biases, norms, scalars such as step counters) stay replicated: sharding them
saves little and costs one collective each. An array with no divisible
dimension stays replicated too (the message of :func:`describe` counts them).

Nothing here depends on the mode for correctness: the mathematics of a step
is the same, only the float32 summation order of the gradient reductions
differs (tests/test_fsdp.py).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clrjax.parallel import DATA_AXIS

MODES = ("replicated", "fsdp")


def fsdp_spec(shape, num_shards: int, min_size: int) -> P:
    """PartitionSpec of one array under the FSDP rule (module docstring); ``P()`` = replicated."""
    if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    divisible = [i for i, n in enumerate(shape) if n > 0 and n % num_shards == 0]
    if not divisible:
        return P()
    dim = max(divisible, key=lambda i: (shape[i], -i))  # the largest; the first on a tie
    return P(*([None] * dim + [DATA_AXIS]))


def leaf_spec(shape, mesh: Mesh, mode: str, min_size: int) -> P:
    if mode == "replicated":
        return P()
    if mode == "fsdp":
        return fsdp_spec(shape, mesh.shape[DATA_AXIS], min_size)
    raise ValueError(f"unknown sharding mode {mode!r}; one of {MODES}")


def shardings_of(abstract_tree: Any, mesh: Mesh, mode: str = "replicated", min_size: int = 1) -> Any:
    """A NamedSharding for every leaf (array or ShapeDtypeStruct) of ``abstract_tree``."""
    return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(tuple(x.shape), mesh, mode, min_size)),
                        abstract_tree)


def config_shardings(abstract_tree: Any, mesh: Mesh, sharding_config) -> Any:
    """:func:`shardings_of` with the mode and minimum size of ``config.sharding``."""
    return shardings_of(abstract_tree, mesh, str(sharding_config["mode"]), int(sharding_config["min_size"]))


def per_device_bytes(tree: Any, shardings: Optional[Any] = None) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) under its shardings.

    With ``shardings`` None each leaf's own ``.sharding`` is used. A leaf
    split N ways counts 1/N of its bytes, a replicated one all of them.
    """
    leaves = jax.tree.leaves(tree)
    found = [x.sharding for x in leaves] if shardings is None else jax.tree.leaves(
        shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    return int(sum(int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64)) * np.dtype(x.dtype).itemsize
                   for x, s in zip(leaves, found)))


def describe(tree: Any, shardings: Any) -> str:
    """One line for the log: how many arrays (and bytes) are sharded, how many stay replicated."""
    leaves = jax.tree.leaves(tree)
    specs = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    sharded = [x for x, s in zip(leaves, specs) if not s.is_fully_replicated]
    total = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in leaves)
    in_shards = sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in sharded)
    return (f"{len(sharded)} of {len(leaves)} state arrays sharded ({in_shards / 2**20:.1f} of "
            f"{total / 2**20:.1f} MiB); {per_device_bytes(tree, shardings) / 2**20:.1f} MiB per device")


def gathered(tree: Any) -> Any:
    """The same values replicated on their mesh (a no-op for replicated leaves).

    Evaluation encodes with whole parameters on every device, and a leaf
    sharded over several processes cannot be read by any one of them.
    """
    def one(x):
        sharding = getattr(x, "sharding", None)
        if not isinstance(sharding, NamedSharding) or sharding.is_fully_replicated:
            return x
        return jax.jit(lambda v: v, out_shardings=NamedSharding(sharding.mesh, P()))(x)
    return jax.tree.map(one, tree)


def host_copy(tree: Any) -> Any:
    """Host numpy copies of every leaf, each process getting the whole array.

    Leaves that this process cannot address in full (sharded over several
    processes) are all-gathered, so every process must call this at the same
    point (it is a collective then); otherwise it is ``jax.device_get``.
    """
    leaves = jax.tree.leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    from jax.experimental import multihost_utils
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True))
                        if not getattr(x, "is_fully_addressable", True) else np.asarray(jax.device_get(x)), tree)
