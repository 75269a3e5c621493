"""Measurements behind ``experiments/benchmark.py``: step, input pipeline, losses.

Every figure is measured, never assumed:
  * step time is the median of ``steps`` timed steps after ``warmup`` steps,
    each ended with ``block_until_ready`` (the state is donated, as in training);
  * FLOPs per step come from XLA's cost analysis of the compiled step. On an
    SPMD program XLA reports the FLOPs of *one device's* program (checked
    against a sharded matmul in ``tests/test_benchmark.py``), so the step's
    total is that figure times the number of devices. Two caveats, both from
    how XLA counts: work replicated on every device (the optimizer update of
    replicated parameters) is counted once per device, and a ``while`` loop
    body (``lax.scan``, SimCLR ``chunk_size``) is counted once, not per trip;
  * model FLOPs utilisation (MFU) = model FLOPs per step / step time /
    (peak dense bf16 FLOP/s per device x devices), with the peak looked up
    from the device kind (``PEAK_BF16_TFLOPS``) or given explicitly; CPUs
    have no entry and report n/a. With ``model.remat=True`` the compiled
    step also recomputes activations: its FLOPs give the hardware FLOPs
    utilisation (HFU), and the model FLOPs are counted on the same step
    compiled (never run) without remat;
  * memory is the compiled program's own analysis (temporaries, arguments,
    outputs, per device) plus the device's peak bytes in use where the
    backend reports it (GPU/TPU; not CPU).
"""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from clrjax import config as config_lib
from clrjax import methods as methods_lib, parallel, state_sharding, train
from clrjax.data import augment, pipeline

# Dense (no sparsity) bf16 peak per JAX device, TFLOP/s, from the vendors' documents:
#   NVIDIA H100 SXM 989.4 and H100 PCIe 756 (NVIDIA H100 Tensor Core GPU datasheet: "BFLOAT16
#   Tensor Core 1,979 / 1,513 teraFLOPS", footnoted "with sparsity"; dense is half);
#   H200 SXM 989.4 (NVIDIA H200 Tensor Core GPU datasheet: 1,979 with sparsity; the same GH100
#   compute as the H100 SXM, only the memory differs); A100 312 (NVIDIA A100 datasheet:
#   "BFLOAT16 Tensor Core 312 TFLOPS | 624 TFLOPS*", * with sparsity);
#   Cloud TPU documentation (system architecture page of each version), bf16 per chip: v4 275,
#   v5e ("TPU v5 lite") 197, v5p ("TPU v5") 459, v6e ("TPU v6 lite") 918; v3 123 per chip =
#   61.5 per TensorCore (on v3 each core is one JAX device; on v4 and later one chip is).
# Matching is by substring of ``device.device_kind.lower()``, longest key first, so
# "NVIDIA H100 PCIe" finds "h100 pcie" before "h100". Other variants (e.g. H100 NVL)
# fall back to the generic entry: pass the right peak explicitly (``--peak_tflops``).
PEAK_BF16_TFLOPS = {
    "h100 pcie": 756.0, "h100": 989.4, "h200": 989.4, "a100": 312.0,
    "tpu v3": 61.5, "tpu v4": 275.0, "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0,
    "tpu v5": 459.0, "tpu v6 lite": 918.0, "tpu v6e": 918.0,
}


def peak_tflops(device) -> Optional[float]:
    """Peak dense bf16 TFLOP/s of one device (anything with ``device_kind``), or None (e.g. CPU)."""
    kind = str(getattr(device, "device_kind", device)).lower()
    for name, tflops in sorted(PEAK_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if name in kind:
            return tflops
    return None


def compiled_cost(compiled) -> dict:
    """FLOPs and memory of a compiled executable, per device, as XLA reports them."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    out = {"flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
           "bytes_accessed": float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")}
    for field in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                  "generated_code_size_in_bytes"):
        out[field] = int(getattr(mem, field, -1)) if mem is not None else -1
    return out


def device_peak_memory() -> Optional[int]:
    """Peak bytes in use on local device 0 where the backend reports it (GPU/TPU); None on CPU."""
    device = jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without allocator statistics raise or return None
        stats = None
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
    batch_size: int                 # global images per step (each seen as 2 views)
    devices: int
    median_step_s: float
    min_step_s: float
    images_per_s: float             # batch_size / median_step_s
    flops_per_step: float           # XLA-counted FLOPs of the compiled step, all devices
    model_flops_per_step: float     # the same without remat recomputation (== flops_per_step without remat)
    mfu: Optional[float]            # model FLOPs / time / (peak x devices); None when the peak is unknown
    hfu: Optional[float]            # compiled FLOPs / time / (peak x devices)
    peak_tflops_per_device: Optional[float]
    temp_bytes: int                 # compiled temporaries, per device
    argument_bytes: int             # compiled arguments (state + batch), per device
    output_bytes: int
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


def _first_batch(exp, config):
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    try:
        return parallel.host_to_global(train.model_batch(next(loader)), exp.mesh)
    finally:
        loader.close()


def _model_flops_without_remat(config, mesh) -> Optional[float]:
    """Per-device FLOPs of the same step compiled without remat; None when remat is off."""
    if not bool(config.model.get("remat", False)):
        return None
    plain = config_lib.apply_overrides(config, {"model.remat": False})
    exp = train.build_experiment(plain, mesh)
    state = jax.eval_shape(lambda: train.init_train_state(exp))
    batch = _first_batch(exp, plain)
    compiled = train.make_train_step(exp).lower(state, batch).compile()
    return compiled_cost(compiled)["flops"]


def step_runner(exp, state, batch=None):
    """(compiled train step, ``one_step``) on ``batch`` (default: the first batch of ``exp``'s
    data): ``one_step()`` runs the step with the state donated, as in training, keeps the new
    state for its next call and returns (new state, metrics)."""
    batch = _first_batch(exp, exp.config) if batch is None else batch
    compiled = train.make_train_step(exp).lower(state, batch).compile()
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = compiled(holder["state"], batch)
        return holder["state"], metrics

    return compiled, one_step


def benchmark_step(config, *, steps: int = 10, warmup: int = 2, mesh=None,
                   peak_tflops_per_device: Optional[float] = None) -> StepResult:
    """Median full train-step time, throughput, FLOPs, MFU and memory."""
    exp = train.build_experiment(config, mesh)
    state = train.init_train_state(exp)
    batch = _first_batch(exp, config)
    t0 = time.perf_counter()
    compiled, one_step = step_runner(exp, state, batch)
    compile_s = time.perf_counter() - t0
    cost = compiled_cost(compiled)

    times = time_calls(lambda: one_step()[1]["loss"], steps, warmup)
    median = statistics.median(times)
    n_dev = exp.mesh.size
    total_flops = cost["flops"] * n_dev  # XLA's figure is per device (SPMD program)
    no_remat = _model_flops_without_remat(config, exp.mesh)
    model_flops = total_flops if no_remat is None else no_remat * n_dev
    peak = peak_tflops_per_device or peak_tflops(exp.mesh.devices.flat[0])
    denom = peak * 1e12 * n_dev * median if peak else None
    return StepResult(batch_size=config.batch_size, devices=n_dev, median_step_s=median, min_step_s=min(times),
                      images_per_s=config.batch_size / median, flops_per_step=total_flops,
                      model_flops_per_step=model_flops,
                      mfu=model_flops / denom if denom else None, hfu=total_flops / denom if denom else None,
                      peak_tflops_per_device=peak,
                      temp_bytes=cost["temp_size_in_bytes"], argument_bytes=cost["argument_size_in_bytes"],
                      output_bytes=cost["output_size_in_bytes"], peak_device_bytes=device_peak_memory(),
                      compile_s=compile_s)


def trace_step(config, mesh=None, lower: bool = True) -> dict:
    """Builds and lowers (never compiles or runs) the train step of ``config`` at full size.

    What :func:`benchmark_step` does up to its compilation, with abstract parameters: the
    config is validated, the data source and the model are built, one real batch is read
    and (``lower=True``) the whole step is traced and lowered. A config, data or shape error
    therefore shows in seconds on a CPU (``benchmarks/gpu_run.py --check``), not on a GPU.
    """
    exp = train.build_experiment(config, mesh)
    state = jax.eval_shape(lambda: train.init_train_state(exp))
    batch = _first_batch(exp, config)
    if lower:
        train.make_train_step(exp).lower(state, batch)
    params = getattr(state, "params", state)
    return {"batch_size": int(config.batch_size), "devices": int(exp.mesh.size),
            "batch_image_shape": list(batch["image"].shape),
            "parameters": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))),
            "steps_per_epoch": int(exp.steps_per_epoch), "total_steps": int(exp.total_steps)}


def compile_step_memory(config, mesh=None) -> dict:
    """Per-device memory of the train step from XLA's analysis of the compiled program; nothing runs.

    The state and the batch are abstract (shapes and shardings only), so a
    ViT-B step at batch 4,096 can be sized on a CPU with simulated devices:
    'temp_bytes' (activations and other temporaries), 'argument_bytes' (train
    state + batch), 'output_bytes', and 'total_bytes', their sum with the
    donated state counted once (the output state reuses the argument buffers).
    'params_bytes', 'opt_state_bytes' and 'state_bytes' (the whole train state)
    are what one device holds of them under ``config.sharding``, from the
    leaves' shardings (clrjax/state_sharding.py). 'flops' and 'bytes_accessed'
    are XLA's cost analysis of the same program (one device's share).
    """
    exp = train.build_experiment(config, mesh)
    state = jax.eval_shape(lambda: train.init_train_state(exp))
    shardings = train.train_state_shardings(exp)  # eval_shape's structs carry no sharding
    b, (h, w, c) = config.batch_size, exp.image_shape
    rows = parallel.batch_sharding(exp.mesh)
    batch = {"image": jax.ShapeDtypeStruct((b, h, w, c), jnp.uint8, sharding=rows),
             "label": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows),
             "index": jax.ShapeDtypeStruct((b,), jnp.int32, sharding=rows)}
    t0 = time.perf_counter()
    compiled = train.make_train_step(exp).lower(state, batch).compile()
    cost = compiled_cost(compiled)
    # What one device holds of the state (all of it when replicated): the donated output aliases it.
    state_bytes = state_sharding.per_device_bytes(state, shardings)
    return {"batch_size": b, "micro_batch_size": int(config.micro_batch_size), "devices": exp.mesh.size,
            "sharding": str(config.sharding.mode),
            "params_bytes": state_sharding.per_device_bytes(state.params, shardings.params),
            "opt_state_bytes": state_sharding.per_device_bytes(state.opt_state, shardings.opt_state),
            "state_bytes": state_bytes,
            "temp_bytes": cost["temp_size_in_bytes"], "argument_bytes": cost["argument_size_in_bytes"],
            "output_bytes": cost["output_size_in_bytes"],
            "total_bytes": cost["temp_size_in_bytes"] + cost["argument_size_in_bytes"]
            + max(0, cost["output_size_in_bytes"] - state_bytes),
            "flops": cost["flops"], "bytes_accessed": cost["bytes_accessed"],  # per device, XLA's count
            "compile_s": time.perf_counter() - t0}


def largest_fitting_batch(config, budget_bytes: float, *, mesh=None, start: int = 256,
                          micro_batch_size: int = 0, on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """The largest global batch ``start * 2**k`` whose compiled step needs at most ``budget_bytes``
    per device (``compile_step_memory``'s total), by doubling then bisecting between powers of two
    on multiples of ``start``; with ``micro_batch_size`` the micro-batch stays fixed."""
    def fits(batch: int) -> bool:
        row = compile_step_memory(config_lib.apply_overrides(
            config, {"batch_size": batch, "micro_batch_size": micro_batch_size,
                     "dataset.num_examples": batch}), mesh)
        row["fits"] = row["total_bytes"] <= budget_bytes
        if on_row is not None:
            on_row(row)
        return row["fits"]

    if not fits(start):
        return {"largest_batch": 0, "budget_bytes": budget_bytes}
    low = start
    while fits(2 * low):
        low *= 2
    high = 2 * low  # low fits, high does not: bisect on multiples of start
    while high - low > start:
        mid = (low + high) // 2 // start * start
        low, high = (mid, high) if fits(mid) else (low, mid)
    return {"largest_batch": low, "budget_bytes": budget_bytes}


def benchmark_input(config, *, steps: int = 10, warmup: int = 2, mesh=None) -> dict:
    """Images/s of the host loader alone, and of host loader + transfer + on-device augmentation.

    * host: ``TrainLoader.batch_at`` run synchronously, i.e. what the training
      loop's single prefetch thread can deliver per second;
    * host + augment: the prefetching loader, ``host_to_global`` and the jitted
      two-view augmentation, blocked on each batch. In training the
      augmentation runs inside the step, so this figure is a conservative
      bound on how fast the input side can feed a step.
    """
    exp = train.build_experiment(config, mesh)
    b = config.batch_size
    sync = pipeline.TrainLoader(exp.train_source, b, config.seed, prefetch=0)
    host_times = time_calls(lambda: next(sync)["image"], steps, warmup)
    sync.close()

    aug_cfg = config.augment.to_dict()
    key = jax.random.PRNGKey(0)

    @jax.jit
    def views(batch):
        return augment.views(batch["image"], batch["index"], key, aug_cfg)

    loader = pipeline.TrainLoader(exp.train_source, b, config.seed, prefetch=2)

    def load_and_augment():
        return views(parallel.host_to_global(train.model_batch(next(loader)), exp.mesh))

    try:
        both_times = time_calls(load_and_augment, steps, warmup)
    finally:
        loader.close()
    return {"batch_size": b,
            "host_images_per_s": b / statistics.median(host_times),
            "host_plus_augment_images_per_s": b / statistics.median(both_times)}


def benchmark_losses(methods: Sequence[str], batch_sizes: Iterable[int], dims: Iterable[int], *,
                     mesh=None, steps: int = 5, warmup: int = 1, loss_overrides: Optional[dict] = None,
                     impls: Sequence[str] = ("auto",), on_row: Optional[Callable[[dict], None]] = None) -> list:
    """Forward+backward time and compiled temporary memory of each loss per (N, d).

    ``impls`` sweeps ``impl`` ('auto'|'replicated'|'column_split') for the losses
    that take it (Barlow Twins, VICReg, TiCo); SimCLR has no ``impl`` and runs once.
    A row that fails (e.g. out of device memory at large N, d) records the error.
    ``on_row`` is called with each row as soon as it is measured (progress printing).
    """
    mesh = parallel.make_mesh() if mesh is None else mesh
    batch_sizes, dims = list(batch_sizes), list(dims)
    rows = []
    for method_name in methods:
        method = methods_lib.get(method_name)
        base = dict((loss_overrides or {}).get(method_name, {}))
        takes_impl = "impl" in method.loss_kwarg_defaults()
        variants = [dict(base, impl=i) for i in impls] if takes_impl and "impl" not in base else [base]
        for kwargs in variants:
            for n in batch_sizes:
                for d in dims:
                    try:
                        row = _loss_row(method, kwargs, n, d, mesh, steps, warmup)
                    except Exception as err:  # noqa: BLE001 - record and go on (OOM at large N, d)
                        row = {"method": method.name, "N": n, "d": d, "devices": mesh.size,
                               "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}",
                               **{f"loss.{k}": v for k, v in kwargs.items()}}
                    rows.append(row)
                    if on_row is not None:
                        on_row(row)
    return rows


def _loss_row(method, kwargs, n, d, mesh, steps, warmup) -> dict:
    """One method's per-shard loss over random two-view embeddings [n, 2, d] and 10-class labels."""
    def per_shard(z, batch, state):
        loss, _, _ = method.loss({"embeddings": z}, batch, state, axis_name=parallel.DATA_AXIS, **kwargs)
        return loss

    rows = P(parallel.DATA_AXIS)
    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(rows, rows, P()), out_specs=P())
    grad_fn = jax.jit(jax.value_and_grad(sharded))
    key_z, key_y = jax.random.split(jax.random.PRNGKey(0))
    sharding = parallel.batch_sharding(mesh)
    z = jax.device_put(jax.random.normal(key_z, (n, 2, d), jnp.float32), sharding)
    batch = jax.device_put({"label": jax.random.randint(key_y, (n,), 0, 10), "index": jnp.arange(n)}, sharding)
    state_config = config_lib.base_config()
    state_config.projector.out_dim = d
    state = parallel.replicate(method.init_state(state_config, {}), mesh)
    compiled = grad_fn.lower(z, batch, state).compile()
    cost = compiled_cost(compiled)
    times = time_calls(lambda: compiled(z, batch, state), steps, warmup)
    return {"method": method.name, "N": n, "d": d, "devices": mesh.size,
            "median_s": statistics.median(times), "flops_per_device": cost["flops"],
            "temp_bytes_per_device": cost["temp_size_in_bytes"], **{f"loss.{k}": v for k, v in kwargs.items()}}


def environment() -> dict:
    """Device, library versions and the command line, recorded beside every figure."""
    import flax
    import jaxlib
    import optax
    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
            "process_count": jax.process_count(), "host_cpu_count": os.cpu_count(),
            "jax": jax.__version__, "jaxlib": getattr(jaxlib, "__version__", "?"), "flax": flax.__version__,
            "optax": optax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
