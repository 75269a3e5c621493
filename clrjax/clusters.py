"""Is this process one of several that a cluster started together?

``clrjax.parallel.initialize_distributed`` calls ``jax.distributed.initialize()``
without arguments only when the answer is yes, and JAX then finds the
coordinator, process count and id itself. The answer must therefore be yes
exactly when JAX's own cluster detection (jax 0.10.2,
``jax/_src/clusters/``) would find a multi-process job, and no otherwise:

* SLURM (``slurm_cluster.py``, ``SlurmCluster.is_env_present``): all of
  ``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_NTASKS``,
  ``SLURM_PROCID`` and ``SLURM_LOCALID`` are set. Only ``srun`` sets
  ``SLURM_STEP_NODELIST``; the batch script of a job with ``--ntasks=2`` has
  ``SLURM_NTASKS=2`` without it (seen with slurm-wlm 22.05), and one process
  started there is alone: it runs as one process.
* Cloud TPU VM pods (``cloud_tpu_cluster.py``): only on a TPU VM
  (``jax._src.cloud_tpu_init.running_in_cloud_tpu_vm``, set when ``import
  jax`` finds TPU chips and libtpu). ``GkeTpuCluster`` reads the workers from
  ``TPU_PROCESS_ADDRESSES`` or else ``TPU_WORKER_HOSTNAMES`` (GKE sets them);
  ``GceTpuCluster`` (``gcloud compute tpus tpu-vm ssh --worker=all``) asks the
  GCE metadata server for ``instance/attributes/worker-network-endpoints``
  (comma-separated, each ``host`` or ``name:id:ip``), unless
  ``TPU_SKIP_MDS_QUERY`` is set. Several workers mean several processes.

The metadata query is a function argument so that tests can fake the server.
"""
from __future__ import annotations

import os
import urllib.error
import urllib.request
from typing import Callable, Mapping, Optional

SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
METADATA_TIMEOUT_S = 10.0

MetadataFn = Callable[[str], Optional[str]]


def slurm_processes(environ: Mapping[str, str]) -> int:
    """The process count of the SLURM step this process belongs to; 1 outside a step."""
    if not all(var in environ for var in SLURM_STEP_VARS):
        return 1
    return int(environ["SLURM_NTASKS"])


def slurm_outside_step_note(environ: Mapping[str, str]) -> Optional[str]:
    """One sentence when the allocation has several tasks but this process was not started by srun."""
    if slurm_processes(environ) > 1 or "SLURM_JOB_ID" not in environ:
        return None
    tasks = environ.get("SLURM_NTASKS", "1")
    if not tasks.isdigit() or int(tasks) <= 1:
        return None
    return (f"SLURM_NTASKS={tasks} but this process was not started by srun (no SLURM_STEP_NODELIST), "
            f"so it runs as one process; start it with `srun` (as launch/slurm.sbatch does) "
            f"to run {tasks} processes.")


def gce_metadata(key: str) -> Optional[str]:
    """``instance/attributes/KEY`` from the GCE metadata server, or None if it has no such key.

    The server and header are those of JAX's ``cloud_tpu_cluster.get_metadata``
    (``GCE_METADATA_IP``, default metadata.google.internal; ``Metadata-Flavor: Google``).
    """
    host = os.environ.get("GCE_METADATA_IP", "metadata.google.internal")
    request = urllib.request.Request(f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
                                     headers={"Metadata-Flavor": "Google"})
    try:
        with urllib.request.urlopen(request, timeout=METADATA_TIMEOUT_S) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def on_cloud_tpu_vm() -> bool:
    """What ``import jax`` concluded: TPU chips on the PCI bus and libtpu installed."""
    try:  # private, but it is the flag JAX's own TPU detection reads
        from jax._src import cloud_tpu_init
    except ImportError:  # a JAX that moved it: then GceTpuCluster moved too; pass the flags explicitly
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _worker_count(worker_list: str) -> int:
    return len([w for w in worker_list.split(",") if w.strip()])


def tpu_processes(environ: Mapping[str, str], tpu_vm: bool, metadata: Optional[MetadataFn] = None) -> int:
    """The number of workers of this Cloud TPU VM slice (one JAX process each); 1 elsewhere."""
    metadata = metadata or gce_metadata
    if not tpu_vm:
        return 1
    hosts = environ.get("TPU_PROCESS_ADDRESSES", environ.get("TPU_WORKER_HOSTNAMES"))
    if hosts is not None:  # GkeTpuCluster is tried before GceTpuCluster
        return _worker_count(hosts)
    if environ.get("TPU_SKIP_MDS_QUERY") is not None:
        return 1
    endpoints = metadata("worker-network-endpoints")
    return _worker_count(endpoints) if endpoints else 1


def multi_process_cluster(environ: Optional[Mapping[str, str]] = None, tpu_vm: Optional[bool] = None,
                          metadata: Optional[MetadataFn] = None) -> bool:
    """True when jax.distributed.initialize() without arguments would join several processes."""
    environ = os.environ if environ is None else environ
    if slurm_processes(environ) > 1:
        return True
    tpu_vm = on_cloud_tpu_vm() if tpu_vm is None else tpu_vm
    return tpu_processes(environ, tpu_vm, metadata) > 1
