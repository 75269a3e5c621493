r"""Cost of multi-crop: the train step with 2 crops against 2 + V crops, interleaved, on one process.

COMMAND:
  .venv/bin/python benchmarks/multicrop_cost.py --config=configs/simclr.py:digits \
      --overrides='augment.multicrop.num_local=4;augment.multicrop.local_size=4' [--rounds=6] [--steps=10]

Both steps (the config as given with multi-crop off, and with the overrides) are compiled first,
then timed in ``rounds`` alternating blocks of ``steps`` steps each on the same batches, so that a
change of load on shared cores hits both alike; prints the median seconds per step of each, their
ratio, and XLA's FLOPs per compiled step (load-independent). The README's multi-crop row used the
ratio to give the multi-crop run the 2-crop run's training time in fewer steps.
"""
import argparse
import ast
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402

from clrjax import config as config_lib, parallel, train  # noqa: E402
from clrjax.data import pipeline  # noqa: E402


def _overrides(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(";")):
        key, _, value = item.partition("=")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def _prepared(config, mesh, batches):
    exp = train.build_experiment(config, mesh)
    step = train.make_train_step(exp)
    state = train.init_train_state(exp)
    lowered = step.lower(state, batches[0])
    flops = (lowered.compile().cost_analysis() or {}).get("flops", float("nan"))
    state, _ = step(state, batches[0])                        # compile and warm up
    jax.block_until_ready(state)
    return {"step": step, "state": state, "flops": flops}


def _timed_block(run, batches, steps):
    start = time.perf_counter()
    for i in range(steps):
        run["state"], metrics = run["step"](run["state"], batches[i % len(batches)])
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--overrides", required=True, help="dotted field=value pairs, ';'-separated")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)

    base = config_lib.load_config_file(args.config)
    base.augment.multicrop.num_local = 0
    crops = config_lib.apply_overrides(base, _overrides(args.overrides))
    mesh = parallel.make_mesh(jax.local_devices())
    exp = train.build_experiment(base, mesh)
    loader = pipeline.TrainLoader(exp.train_source, base.batch_size, base.seed, prefetch=0)
    batches = [parallel.host_to_global(train.model_batch(next(loader)), mesh) for _ in range(4)]
    loader.close()
    runs = {"2 crops": _prepared(base, mesh, batches), "multi-crop": _prepared(crops, mesh, batches)}
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            times[name].append(_timed_block(run, batches, args.steps))
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name in runs:
        print(f"{name:10s} median {1e3 * medians[name]:8.1f} ms/step  (rounds: "
              f"{', '.join(f'{1e3 * t:.0f}' for t in times[name])})  {runs[name]['flops'] / 1e9:.3f} GFLOP/step")
    print(f"ratio multi-crop / 2 crops: time {medians['multi-crop'] / medians['2 crops']:.3f}, "
          f"FLOPs {runs['multi-crop']['flops'] / runs['2 crops']['flops']:.3f}")


if __name__ == "__main__":
    main()
