"""Step time of gradient caching against the plain step, both in one process, interleaved.

COMMAND: .venv/bin/python benchmarks/gradient_cache_cost.py ENCODER BATCH MICRO ROUNDS
  e.g. .venv/bin/python benchmarks/gradient_cache_cost.py vit_tiny 256 64 5

SimCLR's cifar10 preset on synthetic 32x32 images, one device. Both steps are compiled first;
then ROUNDS rounds each time 3 plain and 3 cached steps, so load on a shared machine falls on
both alike. Prints the median wall time and the median process CPU time (all threads) of a
step and their ratios. The cached step runs one extra forward pass per step (pass 1), so on
FLOPs alone the ratio is about 4/3 (forward = 1, backward = 2).
"""
import os
import statistics
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
from clrjax import benchmarking, config as config_lib, train  # noqa: E402
import configs.simclr as simclr  # noqa: E402


def compiled_step(base, micro: int):
    """``one_step`` (benchmarking.step_runner) of ``base`` with ``micro_batch_size=micro``,
    compiled and run once."""
    exp = train.build_experiment(config_lib.apply_overrides(base, {"micro_batch_size": micro}))
    _, one_step = benchmarking.step_runner(exp, train.init_train_state(exp))
    jax.block_until_ready(one_step()[0])
    return one_step


def timed_steps(one_step, count: int):
    """(wall seconds, process CPU seconds) of ``count`` steps, each blocked on."""
    wall, cpu = [], []
    for _ in range(count):
        t0, c0 = time.perf_counter(), time.process_time()
        jax.block_until_ready(one_step()[0])
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu


def main(enc: str, batch: int, micro: int, rounds: int) -> None:
    base = benchmarking.synthetic_config(simclr.get_config(f"cifar10,encoder={enc}"), batch)
    base = config_lib.apply_overrides(base, {"batch_size": batch})
    steps = {m: compiled_step(base, m) for m in (0, micro)}
    wall, cpu = {m: [] for m in steps}, {m: [] for m in steps}
    for _ in range(rounds):
        for m, step in steps.items():
            w, c = timed_steps(step, 3)
            wall[m] += w
            cpu[m] += c
    w = {m: statistics.median(t) for m, t in wall.items()}
    c = {m: statistics.median(t) for m, t in cpu.items()}
    print(f"encoder={enc} batch={batch} micro={micro} devices={jax.device_count()}: median wall s "
          f"full={w[0]:.4f} cached={w[micro]:.4f} ratio={w[micro] / w[0]:.3f}; median CPU s "
          f"full={c[0]:.4f} cached={c[micro]:.4f} ratio={c[micro] / c[0]:.3f}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
