"""Devices, the data mesh, shardings, multi-process start-up, host->global arrays.

clrjax trains data-parallel over a one-axis mesh named ``'data'``: the batch
is sharded over every device of every process, parameters are replicated.
The mesh uses the Auto axis type on purpose: ``jax.make_mesh`` defaults to
Explicit axes in recent JAX, under which a matmul over row-sharded activations
raises ``ShardingTypeError`` (seen with jax 0.10).
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clrjax import clusters

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[Sequence[int]] = None) -> bool:
    """Starts JAX's multi-controller runtime when the run is multi-process.

    Explicit arguments win; otherwise ``jax.distributed.initialize()`` detects
    Cloud TPU pods and SLURM steps itself, called only when ``clrjax.clusters``
    finds what JAX's detection would find. One-process runs need nothing and
    return False without touching the runtime.
    """
    explicit = coordinator_address is not None or (num_processes or 1) > 1
    auto = not explicit and _cluster_detected()
    if not explicit and not auto:
        return False
    kwargs = {}
    if coordinator_address is not None:
        kwargs["coordinator_address"] = coordinator_address
    if num_processes is not None:
        kwargs["num_processes"] = num_processes
    if process_id is not None:
        kwargs["process_id"] = process_id
    if local_device_ids is not None:
        kwargs["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**kwargs)
    return True


def _cluster_detected() -> bool:
    """True in a SLURM step of several tasks or on a multi-worker Cloud TPU VM (``clrjax.clusters``)."""
    note = clusters.slurm_outside_step_note(os.environ)
    if note:
        print(f"clrjax: {note}", file=sys.stderr, flush=True)
    return clusters.multi_process_cluster()


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A one-axis ``'data'`` mesh over ``devices`` (default: all global devices)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data axis."""
    if DATA_AXIS not in mesh.axis_names:
        # Checked here so the error says which axis callers (train step, feature
        # extraction) need, rather than NamedSharding's resource-axis message.
        raise ValueError(f"The batch is sharded over the mesh's '{DATA_AXIS}' axis; "
                         f"this mesh has axes {mesh.axis_names}.")
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_to_global(local_batch, mesh: Mesh):
    """Assembles each process's local rows into one batch-sharded global Array.

    The global batch is the concatenation of the processes' local batches in
    process order (``jax.make_array_from_process_local_data``).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                        local_batch)


def replicate(tree, mesh: Mesh):
    """Places a host pytree fully replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))


def is_main_process() -> bool:
    return jax.process_index() == 0
