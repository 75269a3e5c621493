"""The benchmark harness works: experiments/benchmark.py modes, FLOPs accounting, peak lookup,
the PyTorch reference and the GPU script. Performance itself is never asserted here; the
figures live in BENCHMARKS.md with the commands that produced them."""
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clrjax import benchmarking
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.widths=(8,16,16,16)", "--config.projector.hidden_dims=(32,)",
        "--config.projector.out_dim=16", "--config.batch_size=64"]


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5", 459.0),
    ("TPU v5p", 459.0), ("TPU v6 lite", 918.0), ("TPU v3", 61.5), ("cpu", None), ("NVIDIA GeForce RTX 3090", None),
])
def test_peak_tflops_by_device_kind(kind, peak):
    assert benchmarking.peak_tflops(types.SimpleNamespace(device_kind=kind)) == peak


def test_cost_analysis_flops_are_per_device():
    """XLA's 'flops' of an SPMD program is one device's share: the step total is flops x devices."""
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    m, k, n = 512, 256, 128
    fn = jax.jit(lambda a, b: a @ b, in_shardings=(NamedSharding(mesh, P("data")), NamedSharding(mesh, P())),
                 out_shardings=NamedSharding(mesh, P("data")))
    compiled = fn.lower(jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)).compile()
    cost = benchmarking.compiled_cost(compiled)
    assert cost["flops"] == pytest.approx(2 * m * k * n / mesh.size)
    assert cost["argument_size_in_bytes"] > 0 and cost["temp_size_in_bytes"] >= 0


def test_benchmark_cli_all_modes(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(8))
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "benchmark.py"),
           "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits", *TINY,
           "--mode=step,input,loss", "--sweep_batch=32,64", "--steps=2", "--warmup=1",
           "--loss_methods=simclr,barlow_twins", "--loss_impl=replicated,column_split",
           "--loss_batch=64", "--loss_dims=16", f"--json_out={out}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert "device: cpu x8" in text and "jax " in text
    assert text.count("step  batch") == 2 and "img/s" in text and "MFU    n/a" in text
    assert "host + on-device augmentation" in text
    assert "input/step throughput ratio" in text
    assert "loss simclr " in text and "barlow_twins/replicated" in text and "barlow_twins/column_split" in text

    res = json.loads(out.read_text())
    env_rec = res["environment"]
    for key in ("backend", "device_kind", "device_count", "jax", "jaxlib", "flax", "optax", "command"):
        assert key in env_rec
    assert env_rec["device_count"] == 8 and "--sweep_batch=32,64" in env_rec["command"]
    assert [r["batch_size"] for r in res["step"]] == [32, 64]
    for row in res["step"]:
        assert row["median_step_s"] > 0 and row["images_per_s"] > 0 and row["devices"] == 8
        assert row["flops_per_step"] > 0 and row["model_flops_per_step"] == row["flops_per_step"]
        assert row["mfu"] is None and row["peak_device_bytes"] is None  # CPU: no peak, no allocator stats
        assert row["argument_bytes"] > 0 and row["compile_s"] > 0
    # Twice the batch is about twice the FLOPs (the step is linear in B up to the tiny loss).
    assert 1.6 < res["step"][1]["flops_per_step"] / res["step"][0]["flops_per_step"] < 2.4
    inp = res["input"]
    assert inp["host_images_per_s"] > 0 and inp["host_plus_augment_images_per_s"] > 0
    assert res["input_to_step_ratio"] == pytest.approx(
        inp["host_plus_augment_images_per_s"] / res["step"][1]["images_per_s"])
    loss_rows = res["loss"]
    assert [(r["method"], r.get("loss.impl")) for r in loss_rows] == [
        ("simclr", None), ("barlow_twins", "replicated"), ("barlow_twins", "column_split")]
    for r in loss_rows:
        assert "error" not in r and r["median_s"] > 0 and r["flops_per_device"] > 0 and r["N"] == 64


def test_gpu_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    script = os.path.join(ROOT, "benchmarks", "run_gpu_benchmarks.sh")
    proc = subprocess.run([bash, "-n", script], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_torch_reference_smoke(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "torch.json"
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "torch_reference.py"), "--arch=tiny",
           "--image_size=32", "--batch_size=8", "--steps=2", "--warmup=1", "--no_compile",
           f"--json_out={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    assert line == json.loads(out.read_text())
    assert line["framework"] == "torch" and line["arch"] == "tiny" and line["views_per_step"] == 16
    assert line["median_step_s"] > 0 and line["images_per_s"] > 0 and np.isfinite(line["final_loss"])


def test_torch_nt_xent_matches_clrjax_simclr():
    torch = pytest.importorskip("torch")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from torch_reference import nt_xent
    finally:
        sys.path.pop(0)
    from clrjax.losses import simclr_loss
    z = np.random.RandomState(0).randn(16, 8).astype(np.float32)  # rows 2i, 2i+1: the views of image i
    ref = float(nt_xent(torch.tensor(z), 0.1))
    ours = float(simclr_loss(jnp.asarray(z[0::2]), jnp.asarray(z[1::2]), temperature=0.1, monitors=False)[0])
    assert ours == pytest.approx(ref, rel=1e-5)
