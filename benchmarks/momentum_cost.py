r"""Cost of the momentum methods: the EMA target and the MoCo v2 queue, and their step against the
same step without a momentum encoder.

COMMAND:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/momentum_cost.py \
      [--parts=state,queue,step] [--steps=4] [--json_out=momentum_cost.json]

Parts (each built on clrjax.benchmarking, as experiments/benchmark.py):
  state  bytes per device of the method state under config.sharding (replicated by default): the
         target network (``method_state['target']``: the EMA of encoder + projector, parameters and
         BatchNorm statistics) and the MoCo v2 queue, for the ImageNet presets (ResNet-50), from
         abstract shapes (nothing is compiled); also with config.sharding.mode=fsdp.
  queue  compile-only memory and cost analysis of the MoCo v2 ImageNet step (ResNet-50, batch 256,
         224 px) on all devices (8 simulated), at K = 65,536 and at K = 256 (one batch, the smallest
         queue), d = 128: the queue's share of the compiled temporaries, arguments and FLOPs is their
         difference over the K = 65,536 figure.
  step   the issue's bound: a momentum step may cost at most one forward pass of the target more
         than the SSL step it replaces. That step is the same method with its target replaced by
         the online networks under stop-gradient (:func:`without_momentum_encoder`: BYOL becomes
         SimSiam-style, MoCo v3 takes its keys from the online projections, MoCo v2 keeps its queue
         logits and its enqueue, with online keys: He et al. 2019's momentum m = 0), so the two steps
         differ exactly by the target forward, the EMA update and the trainer's finite-check of the
         target in the state. One device, a small size (cnn_small, 28 px synthetic images, batch 256,
         projector 512-128, predictor 512-128, MoCo v2 queue K = 4,096). For each method XLA's FLOPs
         and bytes accessed of the compiled momentum step, of its baseline, of one target forward
         alone (``MomentumMethod.target_forward``: encoder + projector, training mode, both views),
         of the EMA update alone (``after_update``) and of the state guard of the target alone; the
         excess of the step over baseline + forward and what of it the EMA and the guard explain.
         Median step times of all programs, timed in 5 interleaved rounds; SimCLR's step for reference.
FLOPs and bytes accessed are XLA's counts of the compiled programs (load-independent); step times are
wall-clock on this machine (load-dependent).
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clrjax import benchmarking, config as config_lib, parallel, state_sharding, train  # noqa: E402
from clrjax.methods.base import Method  # noqa: E402
from clrjax.methods.momentum import MomentumMethod  # noqa: E402

MOMENTUM_METHODS = ("byol", "moco_v3", "moco_v2")
SMALL = {"batch_size": 256, "projector.hidden_dims": (512,), "projector.out_dim": 128,
         "predictor.hidden_dims": (512,), "queue.size": 4096, "micro_batch_size": 0}
COSTS = ("flops", "bytes_accessed")


def _config(method, preset, overrides=None):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + f":{preset}")
    config = config_lib.apply_overrides(config, overrides or {})
    return benchmarking.synthetic_config(config, num_examples=config.batch_size)


# --------------------------------------------------------------------------- state and queue


def state_bytes(method, overrides=None) -> dict:
    """Per-device bytes of params, optimizer state, target and queue of the ImageNet preset (abstract)."""
    exp = train.build_experiment(_config(method, "imagenet", overrides))
    state = jax.eval_shape(lambda: train.init_train_state(exp))
    shardings = train.train_state_shardings(exp)
    ms, ms_sh = state.method_state, shardings.method_state
    row = {"method": method, "encoder": exp.config.model.name, "devices": exp.mesh.size,
           "sharding": str(exp.config.sharding.mode),
           "params_bytes": state_sharding.per_device_bytes(state.params, shardings.params),
           "opt_state_bytes": state_sharding.per_device_bytes(state.opt_state, shardings.opt_state),
           "target_bytes": state_sharding.per_device_bytes(ms["target"], ms_sh["target"])}
    if "queue" in ms:
        row.update(queue_bytes=state_sharding.per_device_bytes(ms["queue"], ms_sh["queue"]),
                   queue_shape=list(ms["queue"].shape))
    return row


def queue_share() -> dict:
    """Compiled memory and FLOPs of the MoCo v2 ImageNet step at K = 65,536 vs K = 256 (d = 128)."""
    rows = {}
    for k in (65536, 256):
        rows[k] = benchmarking.compile_step_memory(_config("moco_v2", "imagenet", {"queue.size": k}))
        print(f"moco_v2 ResNet-50 B=256 K={k}: temp {rows[k]['temp_bytes'] / 2**20:.1f} MiB/dev, "
              f"args {rows[k]['argument_bytes'] / 2**20:.1f} MiB/dev, "
              f"{rows[k]['flops'] / 1e9:.1f} GFLOP/dev", flush=True)
    big, small = rows[65536], rows[256]
    return {"K65536": big, "K256": small,
            "queue_temp_bytes": big["temp_bytes"] - small["temp_bytes"],
            "queue_temp_share": (big["temp_bytes"] - small["temp_bytes"]) / big["temp_bytes"],
            "queue_argument_bytes": big["argument_bytes"] - small["argument_bytes"],
            "queue_total_share": (big["total_bytes"] - small["total_bytes"]) / big["total_bytes"],
            "queue_flops": big["flops"] - small["flops"],
            "queue_flops_share": (big["flops"] - small["flops"]) / big["flops"]}


# --------------------------------------------------------------------------- the baseline

MOMENTUM_STATE = ("target", "momentum")  # what MomentumMethod.init_state adds to the method state


def strip_momentum_encoder(method_state: dict) -> dict:
    """The method state without the target network and its momentum (a MoCo v2 queue stays)."""
    return {k: v for k, v in method_state.items() if k not in MOMENTUM_STATE}


def without_momentum_encoder(method: MomentumMethod) -> MomentumMethod:
    """The same method with its target network replaced by the online one under stop-gradient.

    ``outputs['targets']`` are the online projections of the same forward pass
    (``stop_gradient(outputs['embeddings'])``), the state holds no target and no
    momentum, and ``after_update`` is the identity: the step the momentum step
    replaces, with everything else of the method kept (BYOL's predictor, MoCo
    v3's key gather, MoCo v2's queue logits and enqueue). At step 0, where the
    target equals the online networks, it computes the same loss and update as
    the momentum method (tests/test_momentum_cost.py). Two views only (no multi-crop).
    """
    cls = type(method)

    class WithoutMomentumEncoder(cls):
        def init_state(self, config, variables):
            return strip_momentum_encoder(cls.init_state(self, config, variables))

        def forward(self, model, variables, views, state, *, train: bool):
            # Method.forward: the online networks on every view, skipping MomentumMethod.forward's target.
            outputs, batch_stats = Method.forward(self, model, variables, views, state, train=train)
            outputs["targets"] = jax.lax.stop_gradient(outputs["embeddings"])
            return outputs, batch_stats

        def after_update(self, state, *, params, batch_stats, step, total_steps):
            del params, batch_stats, step, total_steps
            return state

    WithoutMomentumEncoder.__name__ = WithoutMomentumEncoder.__qualname__ = f"{cls.__name__}WithoutMomentumEncoder"
    return WithoutMomentumEncoder(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})


# --------------------------------------------------------------------------- compiled programs


@dataclasses.dataclass
class Program:
    cost: dict          # benchmarking.compiled_cost of the compiled program (per device)
    run: object = None  # () -> outputs of one call of the compiled program (None: not runnable);
    #                     a step returns (new state, metrics) and keeps the new state for its next call


def small_config(method, overrides=None):
    """The method's Fashion-MNIST preset (cnn_small, 28 px) at SMALL's sizes, synthetic data."""
    return config_lib.apply_overrides(_config(method, "fashion_mnist"), overrides or SMALL)


def _copy(tree):
    """Fresh buffers (each step donates its state, so no two programs may share one)."""
    return jax.tree.map(jnp.copy, tree)


def step_program(exp, state) -> Program:
    """The compiled train step on one real batch, run with ``state`` donated as in training."""
    compiled, one_step = benchmarking.step_runner(exp, state)
    return Program(benchmarking.compiled_cost(compiled), one_step)


def target_forward_program(exp, method_state) -> Program:
    """One forward pass of the target (encoder + projector, train mode) on both views of the batch."""
    b, crop = exp.config.batch_size, exp.config.augment.crop_size
    views = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (b, 2, crop, crop, exp.image_shape[-1])),
                           parallel.batch_sharding(exp.mesh))
    fn = jax.jit(lambda s, v: exp.method.target_forward(exp.model, s, v, train=True))
    compiled = fn.lower(method_state, views).compile()
    return Program(benchmarking.compiled_cost(compiled), lambda: compiled(method_state, views))


def ema_program(exp, state) -> Program:
    """The method's ``after_update`` alone (momentum schedule + EMA of parameters and BatchNorm
    statistics) on the target and its momentum only: the step donates the rest of the method state
    (a MoCo v2 queue), which a program of its own would copy."""
    fn = jax.jit(lambda ms, p, bs, k: exp.method.after_update(ms, params=p, batch_stats=bs, step=k,
                                                               total_steps=exp.total_steps))
    momentum_state = {k: state.method_state[k] for k in MOMENTUM_STATE}
    compiled = fn.lower(momentum_state, state.params, state.batch_stats, state.step).compile()
    return Program(benchmarking.compiled_cost(compiled))


def _guarded(new, old):
    """What the train step does to every floating-point leaf of the new state (train.make_train_step):
    a finite-check, and a select between the new and the old value."""
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(new)]))
    return jax.tree.map(lambda u, d: jnp.where(finite, u, d), new, old), finite


def guard_program(target) -> Program:
    """The train step's finite-check and select on the target's leaves alone (the state carries them)."""
    return Program(benchmarking.compiled_cost(jax.jit(_guarded).lower(target, target).compile()))


def method_programs(config, mesh) -> dict:
    """{'step', 'baseline', 'target_forward', 'ema', 'guard'} programs of one momentum method's config."""
    exp = train.build_experiment(config, mesh)
    base = dataclasses.replace(exp, method=without_momentum_encoder(exp.method))
    state = train.init_train_state(exp)  # once: the baseline's is the same less the target
    base_state = state.replace(method_state=strip_momentum_encoder(state.method_state))
    return {"step": step_program(exp, _copy(state)), "baseline": step_program(base, _copy(base_state)),
            "target_forward": target_forward_program(exp, _copy(state.method_state)),
            "ema": ema_program(exp, state), "guard": guard_program(state.method_state["target"])}


def accounting(costs: dict) -> dict:
    """For FLOPs and bytes accessed: excess = step - (baseline + target forward), and what is left
    of it after the EMA update and the state guard, both in absolute terms and over the forward."""
    out = {}
    for key in COSTS:
        c = {name: costs[name][key] for name in ("step", "baseline", "target_forward", "ema", "guard")}
        excess = c["step"] - c["baseline"] - c["target_forward"]
        residual = excess - c["ema"] - c["guard"]
        out[key] = dict(c, excess=excess, excess_over_forward=excess / c["target_forward"],
                        residual=residual, residual_over_forward=residual / c["target_forward"],
                        bound=c["baseline"] + c["target_forward"],
                        bound_met=c["step"] <= c["baseline"] + c["target_forward"])
    return out


def step_costs(steps: int, rounds: int = 5) -> dict:
    """Costs, accounting and median step times, timed in interleaved rounds so that a change of the
    machine's load between programs does not favour one of them."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    programs = {m: method_programs(small_config(m), mesh) for m in MOMENTUM_METHODS}
    runners = {f"{m}/{p}": prog.run for m, progs in programs.items() for p, prog in progs.items() if prog.run}
    simclr_exp = train.build_experiment(small_config("simclr"), mesh)
    simclr = step_program(simclr_exp, train.init_train_state(simclr_exp))
    runners["simclr/step"] = simclr.run
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            times[name] += benchmarking.time_calls(run, steps, 1)
    out = {"simclr": {"step": dict(simclr.cost, median_s=statistics.median(times["simclr/step"]))}}
    print(f"simclr step (reference) {simclr.cost['flops'] / 1e9:.4f} GFLOP  "
          f"median {out['simclr']['step']['median_s'] * 1e3:.1f} ms", flush=True)
    for m, progs in programs.items():
        row = {p: dict(prog.cost) for p, prog in progs.items()}
        for p in row:
            if f"{m}/{p}" in times:
                row[p].update(median_s=statistics.median(times[f"{m}/{p}"]), min_s=min(times[f"{m}/{p}"]))
        row["accounting"] = accounting(row)
        out[m] = row
        _print_method(m, row)
    return out


def _print_method(method, row):
    print(f"{method}:", flush=True)
    for p in ("baseline", "target_forward", "step", "ema", "guard"):
        t = f"  median {row[p]['median_s'] * 1e3:8.1f} ms" if "median_s" in row[p] else ""
        print(f"  {p:<15} {row[p]['flops'] / 1e9:9.4f} GFLOP  {row[p]['bytes_accessed'] / 2**20:9.2f} MiB{t}")
    for key, unit, scale in (("flops", "GFLOP", 1e9), ("bytes_accessed", "MiB", 2**20)):
        a = row["accounting"][key]
        verdict = "met" if a["bound_met"] else "exceeded"
        print(f"  {key}: bound (baseline + target forward) {verdict}: step - bound = {a['excess'] / scale:+.4f} "
              f"{unit} ({100 * a['excess_over_forward']:+.3f} % of the forward) = EMA {a['ema'] / scale:.4f} + "
              f"guard {a['guard'] / scale:.4f} + residual {a['residual'] / scale:+.4f} {unit} "
              f"({100 * a['residual_over_forward']:+.3f} %)", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="state,queue,step")
    parser.add_argument("--steps", type=int, default=4, help="timed calls per program per round (5 rounds)")
    parser.add_argument("--json_out", default="momentum_cost.json")
    args = parser.parse_args(argv)
    results = {"environment": benchmarking.environment()}
    parts = args.parts.split(",")

    def write():
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2, default=str)

    if "state" in parts:
        results["state"] = [state_bytes(m, {"sharding.mode": mode}) for mode in ("replicated", "fsdp")
                            for m in MOMENTUM_METHODS]
        for r in results["state"]:
            print({k: (f"{v / 2**20:.1f} MiB" if k.endswith("_bytes") else v) for k, v in r.items()}, flush=True)
        write()
    if "queue" in parts:
        results["queue"] = queue_share()
        q = results["queue"]
        print(f"queue share: temp {100 * q['queue_temp_share']:.2f}% ({q['queue_temp_bytes'] / 2**20:.1f} MiB/dev), "
              f"total {100 * q['queue_total_share']:.2f}%, FLOPs {100 * q['queue_flops_share']:.3f}% "
              f"({q['queue_flops'] / 1e9:.2f} GFLOP/dev)", flush=True)
        write()
    if "step" in parts:
        results["step"] = step_costs(args.steps)
        write()
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
