"""Measurements behind ``experiments/benchmark.py``: step, input pipeline, losses.

Every figure is measured, never assumed:
  * step time is the median of ``steps`` timed steps after ``warmup`` steps,
    each ended with ``block_until_ready``;
  * FLOPs per step come from XLA's cost analysis of the compiled step;
  * model FLOPs utilisation (MFU) = FLOPs per step / step time / (peak bf16
    FLOP/s per device x devices), with the peak looked up from the device
    kind (``PEAK_BF16_TFLOPS``); CPUs have no entry and report n/a;
  * memory is the compiled program's own analysis (temporaries, arguments,
    outputs) plus the device's peak bytes in use where the backend reports it.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from clrjax import config as config_lib
from clrjax import losses, parallel, train
from clrjax.data import augment, pipeline

# Dense bf16 peak per chip (TFLOP/s), from the vendors' datasheets:
# NVIDIA H100 SXM 989.4 (H100 datasheet, without sparsity), H200 SXM 989.4 (H200
# datasheet), A100 312 (A100 datasheet); Google Cloud TPU docs: v4 275, v5e 197, v5p 459.
PEAK_BF16_TFLOPS = {
    "h100": 989.4, "h200": 989.4, "a100": 312.0,
    "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v5": 459.0,
}


def peak_tflops(device: jax.Device) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of one device, or None when unknown (e.g. CPU)."""
    kind = device.device_kind.lower()
    for name, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return tflops
    return None


def compiled_cost(compiled) -> dict:
    """FLOPs and memory of a compiled executable (per device, as XLA reports them)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    out = {"flops": float(cost.get("flops", float("nan"))) if cost else float("nan")}
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                  "generated_code_size_in_bytes"):
        out[field] = int(getattr(mem, field, -1)) if mem is not None else -1
    return out


def device_peak_memory() -> Optional[int]:
    """Peak bytes in use on device 0 where the backend reports it (GPU/TPU)."""
    stats = jax.local_devices()[0].memory_stats() if hasattr(jax.local_devices()[0], "memory_stats") else None
    if not stats:
        return None
    return int(stats.get("peak_bytes_in_use", stats.get("bytes_in_use", 0)))


def time_calls(fn: Callable[[], object], steps: int, warmup: int) -> list[float]:
    """Wall seconds of ``steps`` calls after ``warmup`` calls; each call is blocked on."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


@dataclasses.dataclass
class StepResult:
    batch_size: int
    median_step_s: float
    images_per_s: float
    flops_per_step: float
    mfu: Optional[float]
    temp_bytes: int
    argument_bytes: int
    peak_device_bytes: Optional[int]
    compile_s: float


def synthetic_config(config, num_examples: Optional[int] = None):
    """The config on synthetic data of the same image size (no dataset needed)."""
    size = config.augment.crop_size if not config.dataset.image_size else config.dataset.image_size
    channels = len(config.augment.mean)
    return config_lib.apply_overrides(config, {
        "dataset.name": "synthetic", "dataset.image_size": int(size), "dataset.channels": channels,
        "dataset.num_examples": int(num_examples or 4 * config.batch_size),
        "num_steps": 1000, "eval.final": False,
    })


def benchmark_step(config, *, steps: int = 10, warmup: int = 2, mesh=None) -> StepResult:
    """Median full train-step time, throughput, FLOPs, MFU and memory."""
    exp = train.build_experiment(config, mesh)
    state = train.init_train_state(exp)
    step_fn = train.make_train_step(exp)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    batch = parallel.host_to_global(train._model_batch(next(loader)), exp.mesh)
    loader.close()
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled_cost(compiled)

    holder = {"state": state}

    def one_step():
        holder["state"], m = compiled(holder["state"], batch)
        return m["loss"]

    times = time_calls(one_step, steps, warmup)
    median = statistics.median(times)
    # XLA reports per-device FLOPs of the SPMD program; the step's total is that times devices.
    total_flops = cost["flops"] * exp.mesh.size
    peak = peak_tflops(exp.mesh.devices.flat[0])
    mfu = total_flops / median / (peak * 1e12 * exp.mesh.size) if peak else None
    return StepResult(batch_size=config.batch_size, median_step_s=median,
                      images_per_s=config.batch_size / median, flops_per_step=total_flops, mfu=mfu,
                      temp_bytes=cost["temp_size_in_bytes"], argument_bytes=cost["argument_size_in_bytes"],
                      peak_device_bytes=device_peak_memory(), compile_s=compile_s)


def benchmark_input(config, *, steps: int = 10, warmup: int = 2, mesh=None) -> dict:
    """Images/s of the host loader alone, and of host loader + on-device augmentation."""
    exp = train.build_experiment(config, mesh)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=2)
    host_times = time_calls(lambda: next(loader)["image"], steps, warmup)
    aug_cfg = config.augment.to_dict()
    key = jax.random.PRNGKey(0)

    @jax.jit
    def views(batch):
        return augment.two_views(batch["image"], batch["index"], key, aug_cfg)

    def load_and_augment():
        return views(parallel.host_to_global(train._model_batch(next(loader)), exp.mesh))

    both_times = time_calls(load_and_augment, steps, warmup)
    loader.close()
    b = config.batch_size
    return {"host_images_per_s": b / statistics.median(host_times),
            "host_plus_augment_images_per_s": b / statistics.median(both_times)}


def benchmark_losses(methods: Sequence[str], batch_sizes: Iterable[int], dims: Iterable[int], *,
                     mesh=None, steps: int = 5, warmup: int = 1, loss_overrides: Optional[dict] = None) -> list:
    """Forward+backward time and compiled temporary memory of each loss per (N, d)."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    rows = []
    for method_name in methods:
        method = losses.get_method(method_name)
        kwargs = dict((loss_overrides or {}).get(method_name, {}))
        for n in batch_sizes:
            for d in dims:
                rows.append(_loss_row(method, kwargs, n, d, mesh, steps, warmup))
    return rows


def _loss_row(method, kwargs, n, d, mesh, steps, warmup) -> dict:
    def per_shard(z_a, z_b, state):
        loss, _, _ = method.apply(z_a, z_b, state, axis_name=parallel.DATA_AXIS, **kwargs)
        return loss

    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(parallel.DATA_AXIS),) * 2 + (P(),),
                            out_specs=P())
    grad_fn = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))
    key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
    sharding = parallel.batch_sharding(mesh)
    z_a = jax.device_put(jax.random.normal(key_a, (n, d), jnp.float32), sharding)
    z_b = jax.device_put(jax.random.normal(key_b, (n, d), jnp.float32), sharding)
    state = parallel.replicate(method.init_state(d), mesh)
    compiled = grad_fn.lower(z_a, z_b, state).compile()
    cost = compiled_cost(compiled)
    times = time_calls(lambda: compiled(z_a, z_b, state), steps, warmup)
    return {"method": method.name, "N": n, "d": d, "devices": mesh.size,
            "median_s": statistics.median(times), "flops_per_device": cost["flops"],
            "temp_bytes_per_device": cost["temp_size_in_bytes"], **{f"loss.{k}": v for k, v in kwargs.items()}}


def environment() -> dict:
    """Device and library versions, recorded beside every figure."""
    import flax
    import optax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "process_count": jax.process_count(),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "numpy": np.__version__}
