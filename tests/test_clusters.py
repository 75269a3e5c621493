"""clrjax.clusters decides "several processes" exactly when jax.distributed's own detection would.

The SLURM cases use the variables a real slurm-wlm 22.05 sets (tests/test_slurm_real.py
runs the real thing); the TPU cases fake the TPU VM flag and the GCE metadata server,
which cannot be reached here.
"""
import http.server
import os
import subprocess
import sys
import threading

import pytest

from clrjax import clusters, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What `env` printed in a real job with --ntasks=2 (slurm-wlm 22.05): the batch shell ...
SLURM_BATCH_SHELL = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
# ... and task 1 of `srun` inside it.
SLURM_STEP_TASK = dict(SLURM_BATCH_SHELL, SLURM_STEP_NODELIST="vm", SLURM_PROCID="1", SLURM_LOCALID="1")


def test_slurm_step_of_two_tasks_is_multi_process():
    assert clusters.slurm_processes(SLURM_STEP_TASK) == 2
    assert clusters.multi_process_cluster(SLURM_STEP_TASK, tpu_vm=False)
    assert clusters.slurm_outside_step_note(SLURM_STEP_TASK) is None


@pytest.mark.parametrize("missing", clusters.SLURM_STEP_VARS)
def test_slurm_needs_every_variable_jax_reads(missing):
    env = {k: v for k, v in SLURM_STEP_TASK.items() if k != missing}
    assert clusters.slurm_processes(env) == 1
    assert not clusters.multi_process_cluster(env, tpu_vm=False)


def test_jax_slurm_detection_agrees_on_the_same_environments(monkeypatch):
    """The rule above is JAX's SlurmCluster.is_env_present (jax/_src/clusters/slurm_cluster.py)."""
    from jax._src.clusters import SlurmCluster
    for env, present in ((SLURM_STEP_TASK, True), (SLURM_BATCH_SHELL, False)):
        for key in clusters.SLURM_STEP_VARS:
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert SlurmCluster.is_env_present() is present
        assert (clusters.slurm_processes(env) > 1) is present


def test_one_task_step_is_one_process():
    assert not clusters.multi_process_cluster(dict(SLURM_STEP_TASK, SLURM_NTASKS="1"), tpu_vm=False)


def test_multi_task_allocation_outside_srun_runs_as_one_process_and_says_why():
    assert not clusters.multi_process_cluster(SLURM_BATCH_SHELL, tpu_vm=False)
    note = clusters.slurm_outside_step_note(SLURM_BATCH_SHELL)
    assert "SLURM_NTASKS=2" in note and "srun" in note and "one process" in note
    assert clusters.slurm_outside_step_note({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert clusters.slurm_outside_step_note({}) is None


def test_initialize_distributed_outside_srun_does_not_need_a_coordinator():
    """Was `ValueError: coordinator_address should be defined.` (issue 16.3)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_"))}
    env.update(SLURM_BATCH_SHELL, JAX_PLATFORMS="cpu")
    code = "from clrjax import parallel; import jax; print(parallel.initialize_distributed(), jax.process_count())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "1"]
    assert "not started by srun" in proc.stderr


def _metadata(endpoints):
    asked = []

    def fake(key):
        asked.append(key)
        return {"worker-network-endpoints": endpoints}.get(key)
    return fake, asked


@pytest.mark.parametrize("endpoints, count", [
    ("10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5", 4),                       # new format: hosts
    ("w-0:uid0:10.0.0.2,w-1:uid1:10.0.0.3", 2),                       # old format: name:id:ip
    ("10.0.0.2", 1),                                                  # a single-host TPU VM
    (None, 1),                                                        # no such metadata key
])
def test_tpu_vm_workers_come_from_the_metadata_server(endpoints, count):
    fake, asked = _metadata(endpoints)
    assert clusters.tpu_processes({}, tpu_vm=True, metadata=fake) == count
    assert asked == ["worker-network-endpoints"]
    assert clusters.multi_process_cluster({}, tpu_vm=True, metadata=fake) is (count > 1)


def test_no_metadata_query_off_a_tpu_vm_or_when_jax_is_told_to_skip_it():
    fake, asked = _metadata("a,b")
    assert clusters.tpu_processes({}, tpu_vm=False, metadata=fake) == 1
    assert clusters.tpu_processes({"TPU_SKIP_MDS_QUERY": "1"}, tpu_vm=True, metadata=fake) == 1
    assert asked == []


def test_gke_worker_variables_win_over_the_metadata_server():
    fake, asked = _metadata("a")
    assert clusters.tpu_processes({"TPU_WORKER_HOSTNAMES": "h0,h1"}, tpu_vm=True, metadata=fake) == 2
    assert clusters.tpu_processes({"TPU_PROCESS_ADDRESSES": "h0:1,h1:1,h2:1", "TPU_WORKER_HOSTNAMES": "h0"},
                                  tpu_vm=True, metadata=fake) == 3
    assert asked == []
    # JAX's GkeTpuCluster also requires a TPU VM: the variables alone start nothing.
    assert not clusters.multi_process_cluster({"TPU_WORKER_HOSTNAMES": "h0,h1"}, tpu_vm=False)


def test_plain_gcloud_ssh_on_a_pod_worker_initializes_jax_distributed(monkeypatch):
    """`gcloud ... ssh --worker=all --command="python3 experiments/train.py ..."`: no clrjax variables."""
    for key in list(os.environ):
        if key.startswith(("SLURM_", "TPU_")):
            monkeypatch.delenv(key)
    monkeypatch.setattr(clusters, "on_cloud_tpu_vm", lambda: True)
    monkeypatch.setattr(clusters, "gce_metadata", _metadata("10.0.0.2,10.0.0.3")[0])
    calls = []
    monkeypatch.setattr(parallel.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert parallel.initialize_distributed() is True
    assert calls == [{}]  # no arguments: JAX's GceTpuCluster finds coordinator and ids itself


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = (self.headers.get("Metadata-Flavor") == "Google"
              and self.path == "/computeMetadata/v1/instance/attributes/worker-network-endpoints")
        body = b"10.0.0.2,10.0.0.3" if ok else b"not found"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_gce_metadata_asks_the_server_jax_asks(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _MetadataHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{server.server_port}")
        assert clusters.gce_metadata("worker-network-endpoints") == "10.0.0.2,10.0.0.3"
        assert clusters.gce_metadata("no-such-key") is None
    finally:
        server.shutdown()
        server.server_close()


def test_the_tpu_vm_flag_is_the_one_jax_set_at_import():
    from jax._src import cloud_tpu_init
    assert clusters.on_cloud_tpu_vm() is bool(cloud_tpu_init.running_in_cloud_tpu_vm)
    assert clusters.on_cloud_tpu_vm() is False  # no TPU chips on the test machine
