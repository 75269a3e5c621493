r"""Benchmarks the train step, the input pipeline and the losses on this backend.

COMMAND:
  # full step + input pipeline, synthetic data at the config's image size
  python experiments/benchmark.py --config=configs/simclr.py:imagenet --config.batch_size=256
  # throughput against batch size
  python experiments/benchmark.py --config=configs/simclr.py:cifar10 --sweep_batch=64,128,256
  # compile-only memory per device (nothing runs), with and without gradient caching, and the
  # largest global batch that fits 80 GB per device (8 simulated CPU devices)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmark.py \
      --config=configs/simclr.py:imagenet,encoder=vit_base --config.batch_size=4096 \
      --mode=memory --memory_micro_batch=0,256 --memory_budget_gb=80
  # parameters + optimizer state per device, replicated vs sharded (FSDP), compile-only
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/benchmark.py \
      --config=configs/simclr.py:imagenet,encoder=vit_large --config.batch_size=8 \
      --config.optimizer.name=adamw --config.sharding.mode=fsdp --mode=memory
  # loss-only: forward+backward time and compiled temporary memory per (N, d)
  python experiments/benchmark.py --config=configs/simclr.py:digits --mode=loss \
      --loss_methods=simclr,barlow_twins --loss_batch=1024,4096 --loss_dims=128,2048 \
      --loss_impl=replicated,column_split
Prints a table and writes JSON (--json_out, default benchmark.json) with the device, the
library versions and the command line. The file is rewritten after every measurement, and its
"complete" field turns true once every mode ran, so a run cut short keeps what it measured.
Figures are measured; see clrjax/benchmarking.py for how FLOPs, MFU and memory are counted.
"""
import json
import os

from absl import app, flags
from ml_collections import config_flags

from clrjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/<method>.py:<preset>).",
                                         lock_config=False)
_MODE = flags.DEFINE_list("mode", ["step", "input"], "Any of: step, input, memory, loss.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (median reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_SWEEP_BATCH = flags.DEFINE_list("sweep_batch", None, "Global batch sizes to sweep in step mode.")
_REAL_DATA = flags.DEFINE_bool("real_data", False, "Use the config's dataset instead of synthetic images.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak dense bf16 TFLOP/s per device for MFU; default: "
                           "looked up from the device kind (clrjax.benchmarking.PEAK_BF16_TFLOPS).")
_LOSS_METHODS = flags.DEFINE_list("loss_methods", ["simclr", "barlow_twins", "vicreg", "tico"], "Losses to time.")
_LOSS_BATCH = flags.DEFINE_list("loss_batch", ["1024", "4096"], "Global N for loss mode.")
_LOSS_DIMS = flags.DEFINE_list("loss_dims", ["128", "2048"], "Embedding dims d for loss mode.")
_LOSS_IMPL = flags.DEFINE_list("loss_impl", ["auto"], "impl values swept for Barlow Twins, VICReg, TiCo "
                               "(auto, replicated, column_split).")
_MEMORY_MICRO = flags.DEFINE_list("memory_micro_batch", ["0"], "memory mode: micro_batch_size values to size "
                                  "(0 = no gradient caching).")
_MEMORY_BUDGET = flags.DEFINE_float("memory_budget_gb", 0.0, "memory mode: also search the largest global batch "
                                    "whose step needs at most this many GB (1e9 bytes) per device; 0 = no search.")
_JSON_OUT = flags.DEFINE_string("json_out", "benchmark.json", "Where to write the results.")


def _fmt_bytes(n):
    if n is None or n < 0:
        return "n/a"
    return f"{n / 2**20:,.1f} MiB"


def _fmt_flops(f):
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if f >= scale:
            return f"{f / scale:8.3f} {unit}"
    return f"{f:8.0f} FLOP"


def _fmt_pct(x):
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def _step_rows(config, batch_sizes, on_row=None):
    from clrjax import benchmarking, config as config_lib
    rows = []
    for b in batch_sizes:
        cfg = config_lib.apply_overrides(config, {"batch_size": b})
        if not _REAL_DATA.value:
            cfg = benchmarking.synthetic_config(cfg)
        r = benchmarking.benchmark_step(cfg, steps=_STEPS.value, warmup=_WARMUP.value,
                                        peak_tflops_per_device=_PEAK.value)
        rows.append(r.__dict__)
        print(f"step  batch {b:>6} | {r.median_step_s * 1e3:9.1f} ms | {r.images_per_s:10,.0f} img/s | "
              f"{_fmt_flops(r.flops_per_step)}/step | MFU {_fmt_pct(r.mfu):>6} | HFU {_fmt_pct(r.hfu):>6} | "
              f"temp {_fmt_bytes(r.temp_bytes)}/dev | args {_fmt_bytes(r.argument_bytes)}/dev | "
              f"peak {_fmt_bytes(r.peak_device_bytes)} | compile {r.compile_s:.1f}s", flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def _input_row(config, step_rows):
    from clrjax import benchmarking
    cfg = config if _REAL_DATA.value else benchmarking.synthetic_config(config)
    inp = benchmarking.benchmark_input(cfg, steps=_STEPS.value, warmup=_WARMUP.value)
    print(f"input batch {config.batch_size}: host {inp['host_images_per_s']:,.0f} img/s | "
          f"host + on-device augmentation {inp['host_plus_augment_images_per_s']:,.0f} img/s", flush=True)
    same = [r for r in step_rows or [] if r["batch_size"] == config.batch_size]
    if same:
        step_ips = same[0]["images_per_s"]
        inp["host_to_step_ratio"] = inp["host_images_per_s"] / step_ips
        inp["input_to_step_ratio"] = inp["host_plus_augment_images_per_s"] / step_ips
        print(f"input/step throughput ratio: {inp['input_to_step_ratio']:.2f} with augmentation, "
              f"{inp['host_to_step_ratio']:.2f} host loader alone (>1: the step, not the input, is the "
              f"bottleneck; target >= 1.5)", flush=True)
    return inp


def _print_loss_row(r):
    label = r["method"] + (f"/{r['loss.impl']}" if "loss.impl" in r else "")
    if "error" in r:
        print(f"loss {label:<26} N {r['N']:>6} d {r['d']:>5} | failed: {r['error']}", flush=True)
        return
    print(f"loss {label:<26} N {r['N']:>6} d {r['d']:>5} | fwd+bwd {r['median_s'] * 1e3:9.2f} ms | "
          f"{r['flops_per_device'] / 1e9:9.3f} GFLOP/dev | temp {_fmt_bytes(r['temp_bytes_per_device'])}/dev",
          flush=True)


def _print_memory_row(r):
    fits = "" if "fits" not in r else (" | fits" if r["fits"] else " | does not fit")
    print(f"memory batch {r['batch_size']:>7} micro {r['micro_batch_size'] or '-':>5} | {r['sharding']} params "
          f"{_fmt_bytes(r['params_bytes'])}/dev + optimizer {_fmt_bytes(r['opt_state_bytes'])}/dev | temp "
          f"{_fmt_bytes(r['temp_bytes'])}/dev | args {_fmt_bytes(r['argument_bytes'])}/dev | total "
          f"{_fmt_bytes(r['total_bytes'])}/dev | compile {r['compile_s']:.0f}s{fits}", flush=True)


def _memory_rows(config, results):
    """Compile-only memory of the step per micro-batch setting, and the largest fitting batch."""
    from clrjax import benchmarking, config as config_lib
    results["memory"], results["largest_batch"] = [], []

    def on_row(row):
        _print_memory_row(row)
        results["memory"].append(row)
        _write(results)

    sizes = [int(b) for b in _SWEEP_BATCH.value] if _SWEEP_BATCH.value else [config.batch_size]
    for micro in (int(m) for m in _MEMORY_MICRO.value):
        for b in sizes:
            cfg = benchmarking.synthetic_config(config_lib.apply_overrides(
                config, {"batch_size": b, "micro_batch_size": micro}), num_examples=b)
            on_row(benchmarking.compile_step_memory(cfg))
        if _MEMORY_BUDGET.value > 0:
            cfg = benchmarking.synthetic_config(config, num_examples=config.batch_size)
            found = benchmarking.largest_fitting_batch(cfg, _MEMORY_BUDGET.value * 1e9, micro_batch_size=micro,
                                                       start=max(256, micro), on_row=on_row)
            found["micro_batch_size"] = micro
            print(f"largest global batch within {_MEMORY_BUDGET.value:g} GB/device, micro batch "
                  f"{micro or '-'}: {found['largest_batch']}", flush=True)
            results["largest_batch"].append(found)
            _write(results)


# Checked at the start of main, before anything is built (clrjax/cli.py).
_RULES = (cli.one_of("mode", ("step", "input", "memory", "loss"), many=True),
          cli.int_at_least("steps", 1), cli.int_at_least("warmup", 0),
          cli.ints_at_least("sweep_batch", 1, "global batch sizes"),
          cli.positive_number("peak_tflops"),
          cli.ints_at_least("loss_batch", 1, "global batch sizes N"), cli.ints_at_least("loss_dims", 1, "dims d"),
          cli.one_of("loss_impl", ("auto", "replicated", "column_split"), many=True),
          cli.ints_at_least("memory_micro_batch", 0, "micro_batch_size values, 0 = no gradient caching"),
          cli.positive_number("memory_budget_gb", "GB per device, 0 = no search", allow_zero=True))


def _check_flags() -> None:
    from clrjax import methods
    from clrjax.registry import UnknownNameError

    cli.check_flags("benchmark", _RULES)
    for name in _LOSS_METHODS.value if "loss" in _MODE.value else ():
        try:
            methods.get(name)
        except UnknownNameError as err:
            cli.fail("benchmark", f"--loss_methods has {name!r}, which is not a method; {err.fix}.")
    cli.check_output_file("benchmark", "json_out", _JSON_OUT.value)


def main(argv):
    del argv
    _check_flags()
    from clrjax import config as config_lib
    from clrjax.data import sources
    try:
        cli.write_or_fail("benchmark", lambda: _run(_CONFIG.value), "the results",
                          under=os.path.abspath(_JSON_OUT.value))
    except config_lib.ConfigError as err:
        cli.fail("benchmark", f"config error: {err}")
    except sources.DataError as err:
        cli.fail("benchmark", f"data error: {err}")


def _write(results):
    """Writes the JSON (atomically): after every measurement, so a run cut short keeps what it measured."""
    tmp = _JSON_OUT.value + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=2, default=str)
    os.replace(tmp, _JSON_OUT.value)


def _run(config):
    from clrjax import benchmarking
    env = benchmarking.environment()
    print(f"device: {env['device_kind']} x{env['device_count']} ({env['backend']}) | jax {env['jax']} "
          f"jaxlib {env['jaxlib']} flax {env['flax']} optax {env['optax']} | python {env['python']}")
    print(f"command: {env['command']}")
    # "complete" turns True once every requested mode has been measured.
    results = {"environment": env, "config": config.to_dict(), "complete": False}
    _write(results)
    if "step" in _MODE.value:
        sizes = [int(b) for b in _SWEEP_BATCH.value] if _SWEEP_BATCH.value else [config.batch_size]

        def on_step_row(rows):
            results["step"] = rows
            _write(results)

        results["step"] = _step_rows(config, sizes, on_row=on_step_row)
    if "input" in _MODE.value:
        results["input"] = _input_row(config, results.get("step"))
        if "input_to_step_ratio" in results["input"]:
            results["input_to_step_ratio"] = results["input"]["input_to_step_ratio"]
        _write(results)
    if "memory" in _MODE.value:
        _memory_rows(config, results)
    if "loss" in _MODE.value:
        results["loss"] = []

        def on_loss_row(row):
            _print_loss_row(row)
            results["loss"].append(row)
            _write(results)

        results["loss"] = benchmarking.benchmark_losses(
            _LOSS_METHODS.value, [int(n) for n in _LOSS_BATCH.value], [int(d) for d in _LOSS_DIMS.value],
            steps=_STEPS.value, warmup=_WARMUP.value, impls=_LOSS_IMPL.value, on_row=on_loss_row)
    results["complete"] = True
    _write(results)
    print(f"wrote {_JSON_OUT.value}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.parse_flags)
