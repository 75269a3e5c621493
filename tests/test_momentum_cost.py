"""benchmarks/momentum_cost.py's state part: the bytes it reports are those of the arrays (abstract, fast)."""
import os
import sys

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import momentum_cost  # noqa: E402


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
