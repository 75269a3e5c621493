r"""Benchmarks the train step, the input pipeline and the losses on this backend.

COMMAND:
  # full step + input pipeline, synthetic data at the config's image size
  python experiments/benchmark.py --config=configs/simclr.py:imagenet --config.batch_size=256
  # throughput against batch size
  python experiments/benchmark.py --config=configs/simclr.py:cifar10 --sweep_batch=64,128,256
  # loss-only: forward+backward time and compiled temporary memory per (N, d)
  python experiments/benchmark.py --config=configs/simclr.py:digits --mode=loss \
      --loss_methods=simclr,barlow_twins --loss_batch=1024,4096 --loss_dims=128,2048
Prints a table and writes JSON (--json_out, default benchmark.json) with the device and versions.
"""
import json

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/<method>.py:<preset>).",
                                         lock_config=False)
_MODE = flags.DEFINE_list("mode", ["step", "input"], "Any of: step, input, loss.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_SWEEP_BATCH = flags.DEFINE_list("sweep_batch", None, "Global batch sizes to sweep in step mode.")
_REAL_DATA = flags.DEFINE_bool("real_data", False, "Use the config's dataset instead of synthetic images.")
_LOSS_METHODS = flags.DEFINE_list("loss_methods", ["simclr", "barlow_twins", "vicreg", "tico"], "Losses to time.")
_LOSS_BATCH = flags.DEFINE_list("loss_batch", ["1024", "4096"], "Global N for loss mode.")
_LOSS_DIMS = flags.DEFINE_list("loss_dims", ["128", "2048"], "Embedding dims d for loss mode.")
_JSON_OUT = flags.DEFINE_string("json_out", "benchmark.json", "Where to write the results.")


def _fmt_bytes(n):
    if n is None or n < 0:
        return "n/a"
    return f"{n / 2**20:,.1f} MiB"


def _step_rows(config, batch_sizes):
    from clrjax import benchmarking, config as config_lib
    rows = []
    for b in batch_sizes:
        cfg = config_lib.apply_overrides(config, {"batch_size": b})
        if not _REAL_DATA.value:
            cfg = benchmarking.synthetic_config(cfg)
        r = benchmarking.benchmark_step(cfg, steps=_STEPS.value, warmup=_WARMUP.value)
        rows.append(r.__dict__)
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        print(f"step  batch {b:>6} | {r.median_step_s * 1e3:9.1f} ms | {r.images_per_s:10,.0f} img/s | "
              f"{r.flops_per_step / 1e12:8.3f} TFLOP/step | MFU {mfu:>6} | temp {_fmt_bytes(r.temp_bytes)} | "
              f"peak {_fmt_bytes(r.peak_device_bytes)} | compile {r.compile_s:.1f}s", flush=True)
    return rows


def main(argv):
    del argv
    from clrjax import benchmarking
    config = _CONFIG.value
    env = benchmarking.environment()
    print(f"device: {env['device_kind']} x{env['device_count']} ({env['backend']}) | jax {env['jax']} "
          f"flax {env['flax']} optax {env['optax']}")
    results = {"environment": env, "config": config.to_dict()}
    if "step" in _MODE.value:
        sizes = [int(b) for b in _SWEEP_BATCH.value] if _SWEEP_BATCH.value else [config.batch_size]
        results["step"] = _step_rows(config, sizes)
    if "input" in _MODE.value:
        cfg = config if _REAL_DATA.value else benchmarking.synthetic_config(config)
        inp = benchmarking.benchmark_input(cfg, steps=_STEPS.value, warmup=_WARMUP.value)
        results["input"] = inp
        print(f"input batch {config.batch_size}: host {inp['host_images_per_s']:,.0f} img/s | "
              f"host + on-device augmentation {inp['host_plus_augment_images_per_s']:,.0f} img/s")
        if "step" in results:
            ratio = inp["host_plus_augment_images_per_s"] / results["step"][0]["images_per_s"]
            print(f"input/step throughput ratio: {ratio:.2f} (>1 means the step is the bottleneck)")
            results["input_to_step_ratio"] = ratio
    if "loss" in _MODE.value:
        rows = benchmarking.benchmark_losses(_LOSS_METHODS.value, [int(n) for n in _LOSS_BATCH.value],
                                             [int(d) for d in _LOSS_DIMS.value], steps=_STEPS.value,
                                             warmup=_WARMUP.value)
        results["loss"] = rows
        for r in rows:
            print(f"loss {r['method']:<13} N {r['N']:>6} d {r['d']:>5} | fwd+bwd {r['median_s'] * 1e3:9.2f} ms | "
                  f"{r['flops_per_device'] / 1e9:9.2f} GFLOP/dev | temp {_fmt_bytes(r['temp_bytes_per_device'])}/dev")
    with open(_JSON_OUT.value, "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
