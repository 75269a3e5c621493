r"""Cost of the momentum methods: the EMA target and the MoCo v2 queue, and their step against SimCLR's.

COMMAND:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/momentum_cost.py \
      [--parts=state,queue,step] [--steps=4] [--json_out=momentum_cost.json]

Parts (each built on clrjax.benchmarking, as experiments/benchmark.py):
  state  bytes per device of the method state under config.sharding (replicated by default): the
         target network (``method_state['target']``: the EMA of encoder + projector, parameters and
         BatchNorm statistics) and the MoCo v2 queue, for the ImageNet presets (ResNet-50), from
         abstract shapes (nothing is compiled); also with config.sharding.mode=fsdp.
  queue  compile-only memory analysis of the MoCo v2 ImageNet step (ResNet-50, batch 256, 224 px) on
         all devices (8 simulated), at K = 65,536 and at K = 256 (one batch, the smallest queue), d = 128:
         the queue's share of the compiled temporaries is their difference over the K = 65,536 figure.
  step   one device, a small size (cnn_small, 28 px synthetic images, batch 256, projector 512-128,
         predictor 512-128; every method with the same networks): median step time and XLA's FLOPs of
         the compiled step of simclr, byol, moco_v3 and moco_v2, and of one forward pass of the target
         network (encoder + projector, training mode, both views of the batch), the issue's bound:
         a momentum step may cost at most SimCLR's step + that forward pass. The methods are timed in
         5 interleaved rounds. Also the FLOPs of the pieces in which the steps differ (each loss with
         its backward pass, the predictor with its backward pass, the EMA update).
Step times are wall-clock on this machine (load-dependent); FLOPs are load-independent.
"""
import argparse
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from clrjax import benchmarking, config as config_lib, parallel, state_sharding, train  # noqa: E402

MOMENTUM_METHODS = ("byol", "moco_v3", "moco_v2")
SMALL = {"batch_size": 256, "projector.hidden_dims": (512,), "projector.out_dim": 128,
         "predictor.hidden_dims": (512,), "queue.size": 4096, "micro_batch_size": 0}


def _config(method, preset, overrides=None):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + f":{preset}")
    config = config_lib.apply_overrides(config, overrides or {})
    return benchmarking.synthetic_config(config, num_examples=config.batch_size)


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
    """Compiled memory of the MoCo v2 ImageNet step at K = 65,536 vs K = 256 (d = 128)."""
    rows = {}
    for k in (65536, 256):
        rows[k] = benchmarking.compile_step_memory(_config("moco_v2", "imagenet", {"queue.size": k}))
        print(f"moco_v2 ResNet-50 B=256 K={k}: temp {rows[k]['temp_bytes'] / 2**20:.1f} MiB/dev, "
              f"args {rows[k]['argument_bytes'] / 2**20:.1f} MiB/dev", flush=True)
    big, small = rows[65536], rows[256]
    return {"K65536": big, "K256": small,
            "queue_temp_bytes": big["temp_bytes"] - small["temp_bytes"],
            "queue_temp_share": (big["temp_bytes"] - small["temp_bytes"]) / big["temp_bytes"],
            "queue_argument_bytes": big["argument_bytes"] - small["argument_bytes"],
            "queue_total_share": (big["total_bytes"] - small["total_bytes"]) / big["total_bytes"]}


def _small_experiment(method, mesh):
    return train.build_experiment(config_lib.apply_overrides(_config(method, "fashion_mnist"), SMALL), mesh)


def _compiled_step(exp):
    """(compiled step, state holder, batch) as benchmarking.benchmark_step builds them."""
    state = train.init_train_state(exp)
    batch = benchmarking._first_batch(exp, exp.config)
    compiled = train.make_train_step(exp).lower(state, batch).compile()
    holder = {"state": state}

    def one_step():
        holder["state"], m = compiled(holder["state"], batch)  # donated, as in training
        return m["loss"]

    return compiled, one_step


def _target_forward(exp):
    """One forward pass of the target (encoder + projector, train mode) on both views of the batch."""
    state = train.init_train_state(exp)
    b, crop = exp.config.batch_size, exp.config.augment.crop_size
    views = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (b, 2, crop, crop, exp.image_shape[-1])),
                           parallel.batch_sharding(exp.mesh))
    fn = jax.jit(lambda s, v: exp.method.target_forward(exp.model, s, v, train=True))
    compiled = fn.lower(state.method_state, views).compile()
    return compiled, lambda: compiled(state.method_state, views)


def _flops(fn, *args):
    return benchmarking.compiled_cost(jax.jit(fn).lower(*args).compile())["flops"]


def breakdown_flops(exp_by_method) -> dict:
    """FLOPs of the pieces in which the steps differ: each loss (forward + backward), the predictor
    (forward + backward, both views), the EMA update; inputs at the step's sizes (B = 256, d = 128)."""
    from clrjax.losses import byol_loss, moco_v2_loss, moco_v3_loss, simclr_loss
    from clrjax.methods import momentum

    b, d = SMALL["batch_size"], SMALL["projector.out_dim"]
    z = jax.random.normal(jax.random.PRNGKey(1), (4, b, d))
    queue = jax.random.normal(jax.random.PRNGKey(2), (SMALL["queue.size"], d))
    out = {"loss_simclr": _flops(jax.grad(lambda a, c: simclr_loss(a, c, temperature=0.1)[0], (0, 1)), z[0], z[1]),
           "loss_byol": _flops(jax.grad(lambda p, q: byol_loss(p, q, z[2], z[3])[0], (0, 1)), z[0], z[1]),
           "loss_moco_v3": _flops(jax.grad(lambda p, q: moco_v3_loss(p, q, z[2], z[3])[0], (0, 1)), z[0], z[1]),
           "loss_moco_v2": _flops(jax.grad(lambda q: moco_v2_loss(q, z[1], queue)[0]), z[0])}
    exp = exp_by_method["byol"]
    variables = exp.model.init(jax.random.PRNGKey(0), jnp.zeros((2,) + train.model_input_shape(exp)), train=False)
    predictor = exp.model.predictor

    def predictor_loss(params, x):
        y, _ = predictor.apply({"params": params, "batch_stats": variables["batch_stats"]["predictor"]}, x,
                               train=True, mutable=["batch_stats"])
        return jnp.sum(y)

    x = jax.random.normal(jax.random.PRNGKey(3), (2 * b, d))
    out["predictor_fwd_bwd"] = _flops(jax.grad(predictor_loss, (0, 1)), variables["params"]["predictor"], x)
    target = momentum.target_subtrees(variables["params"])
    out["ema_update"] = _flops(lambda t, o: momentum.ema(t, o, 0.99), target, target)
    return out


def step_costs(steps: int, rounds: int = 5) -> dict:
    """Compiled FLOPs and median step time, timed in interleaved rounds so that a change of the
    machine's load between methods does not favour one of them."""
    mesh = parallel.make_mesh(jax.devices()[:1])
    names = ("simclr",) + MOMENTUM_METHODS
    exps = {m: _small_experiment(m, mesh) for m in names}
    runners, flops = {}, {}
    for m in names:
        compiled, runners[m] = _compiled_step(exps[m])
        flops[m] = benchmarking.compiled_cost(compiled)["flops"]
    compiled, runners["target_forward"] = _target_forward(exps["byol"])
    flops["target_forward"] = benchmarking.compiled_cost(compiled)["flops"]
    times = {m: [] for m in runners}
    for _ in range(rounds):
        for m, run in runners.items():
            times[m] += benchmarking.time_calls(run, steps, 1)
    rows = {m: {"median_s": statistics.median(times[m]), "min_s": min(times[m]), "flops": flops[m]} for m in runners}
    for m, r in rows.items():
        print(f"{m:<15} median {r['median_s'] * 1e3:8.1f} ms  min {r['min_s'] * 1e3:8.1f} ms  "
              f"{r['flops'] / 1e9:8.3f} GFLOP", flush=True)
    bound = {k: rows["simclr"][k] + rows["target_forward"][k] for k in ("median_s", "min_s", "flops")}
    parts = breakdown_flops(exps)
    print({k: f"{v / 1e9:.3f} GFLOP" for k, v in parts.items()}, flush=True)
    return {"rows": rows, "bound_simclr_plus_forward": bound, "breakdown_flops": parts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="state,queue,step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per method per round (5 rounds)")
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
        print(f"queue share of temp: {100 * results['queue']['queue_temp_share']:.1f}% "
              f"({results['queue']['queue_temp_bytes'] / 2**20:.1f} MiB/dev)", flush=True)
        write()
    if "step" in parts:
        results["step"] = step_costs(args.steps)
        write()
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
