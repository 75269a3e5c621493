"""benchmarks/momentum_cost.py: the bytes it reports, the baseline it compares with, its FLOP accounting.

The accounting test relies on XLA's cost analysis being a deterministic count of the compiled
program's operations (no timing is asserted): the momentum step must cost its baseline (the same
method without a momentum encoder) + one target forward + the EMA update + the trainer's
finite-check of the target, and nothing else.
"""
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import momentum_cost  # noqa: E402
from clrjax import parallel  # noqa: E402
from tests.methods.test_harness import tiny_config  # noqa: E402


def _bytes(tree):
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_queue_and_target_bytes_per_device():
    replicated = momentum_cost.state_bytes("moco_v2")
    assert replicated["devices"] == 8 and replicated["queue_shape"] == [65536, 128]
    assert replicated["queue_bytes"] == 65536 * 128 * 4  # K x d float32 on every device
    # The target is the EMA copy of encoder + projector: their parameters and BatchNorm statistics.
    from clrjax import train
    exp = train.build_experiment(momentum_cost._config("moco_v2", "imagenet"))
    state = jax.eval_shape(lambda: train.init_train_state(exp))
    online = {k: state.params[k] for k in ("encoder", "projector")}
    stats = {k: state.batch_stats[k] for k in ("encoder", "projector") if k in state.batch_stats}
    assert replicated["target_bytes"] == _bytes(online) + _bytes(stats)
    sharded = momentum_cost.state_bytes("moco_v2", {"sharding.mode": "fsdp"})
    assert sharded["queue_bytes"] < replicated["queue_bytes"]


# The harness's tiny configs (digits, widths 8-16, batch 32, SGD without warmup, so the first step
# moves the parameters): their momentum steps on one device are those tests/methods/test_harness.py
# compiles, which the suite's compilation cache then serves. BYOL covers MoCo v3's class
# (PredictorMethod, another loss); MoCo v2 its queue.
METHODS = [m if m in ("byol", "moco_v2") else pytest.param(m, marks=pytest.mark.slow)
           for m in momentum_cost.MOMENTUM_METHODS]
_PROGRAMS = {}


def _programs(method):
    if method not in _PROGRAMS:
        _PROGRAMS[method] = momentum_cost.method_programs(tiny_config(method), parallel.make_mesh(jax.devices()[:1]))
    return _PROGRAMS[method]


@pytest.mark.parametrize("method", METHODS)
def test_baseline_is_the_step_with_the_online_networks_as_target(method):
    """At step 0 the target equals the online networks, so the momentum step and its baseline (the
    target replaced by the online networks under stop-gradient) must give the same loss, gradient,
    update and (MoCo v2) queue; the baseline holds no target and updates none."""
    programs = _programs(method)
    (state, metrics), (base_state, base_metrics) = programs["step"].run(), programs["baseline"].run()
    assert set(state.method_state) - set(base_state.method_state) == {"target", "momentum"}
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(base_metrics[key]), float(metrics[key]), rtol=1e-5, err_msg=key)
    jax.tree.map(lambda new, base: np.testing.assert_allclose(base, new, rtol=1e-4, atol=1e-6),
                 jax.device_get(state.params), jax.device_get(base_state.params))
    if method == "moco_v2":
        np.testing.assert_allclose(np.asarray(base_state.method_state["queue"]),
                                   np.asarray(state.method_state["queue"]), rtol=1e-5, atol=1e-6)
    # The momentum step moved its target, by (1 - tau) of the online update: it is not the baseline.
    online, target = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
                      for tree in (state.params["encoder"], state.method_state["target"]["params"]["encoder"]))
    assert np.max(np.abs(online - target)) > 0


@pytest.mark.parametrize("method", METHODS)
def test_step_costs_baseline_plus_one_target_forward_plus_ema(method):
    """XLA's FLOPs of the compiled programs: step = baseline + target forward + EMA + state guard,
    to 0.05 % of the forward. Measured on these tiny networks: within 0.033 % (XLA's fusions differ
    by a few thousand FLOPs), while the EMA and the guard are 0.08 % each, so leaving either out of
    the accounting, or a second target forward in the step, fails."""
    a = momentum_cost.accounting({p: prog.cost for p, prog in _programs(method).items()})["flops"]
    assert a["target_forward"] > 0 and a["ema"] > 0 and a["guard"] > 0
    assert abs(a["residual"]) <= 5e-4 * a["target_forward"], a
