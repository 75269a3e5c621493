"""MoCo v3 (Chen, Xie & He 2021): loss and gradient against float64, keys without gradient, the
N-way accuracy, and the momentum encoder shared with BYOL (clrjax.methods.momentum).

Devices, pmap, train steps and resume: the shared harness (tests/methods).
Tolerances: VALUE_RTOL 1e-5 relative to the largest entry, GRAD_RTOL 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib, methods
from clrjax.losses import moco_v3_loss
from clrjax.methods import momentum
from tests.losses import reference
from tests.losses.cases import assert_close

N, D = 12, 6
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _four(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(N, D))
    return [base + 0.7 * rng.normal(size=(N, D)) for _ in range(4)]  # q_a, q_b, k_a, k_b


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_loss_gradient_and_accuracy_match_float64_reference(temperature):
    arrays = _four()
    loss, metrics = moco_v3_loss(*map(jnp.float32, arrays), temperature=temperature)
    assert_close(loss, reference.moco_v3(*arrays, temperature), VALUE_RTOL, "loss")
    grads = jax.grad(lambda *a: moco_v3_loss(*a, temperature=temperature)[0], argnums=(0, 1, 2, 3))(
        *map(jnp.float32, arrays))
    with jax.enable_x64(True):
        ref = jax.grad(lambda qa, qb: reference.moco_v3(qa, qb, jnp.asarray(arrays[2]), jnp.asarray(arrays[3]),
                                                        temperature, xp=jnp), argnums=(0, 1))(
            *map(jnp.asarray, arrays[:2]))
    for g, r, what in zip(grads[:2], ref, ("q_a", "q_b")):
        assert np.max(np.abs(r)) > 1e-3
        assert_close(g, r, GRAD_RTOL, what)
    for g in grads[2:]:  # the keys get no gradient
        np.testing.assert_array_equal(g, 0.0)
    unit = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in arrays]
    hits = [np.argmax(q @ k.T, axis=1) == np.arange(N) for q, k in ((unit[0], unit[3]), (unit[1], unit[2]))]
    assert_close(metrics["accuracy"], np.mean(np.concatenate(hits)), 1e-6, "accuracy")


def test_perfect_keys_give_the_2t_scaled_lower_bound():
    # orthonormal queries equal to their keys, T small: cross-entropy -> 0, accuracy 1
    u = jnp.float32(np.linalg.qr(np.random.default_rng(2).normal(size=(16, 16)))[0][:8])
    loss, metrics = moco_v3_loss(u, u, u, u, temperature=0.01)
    assert float(loss) < 1e-6 and float(metrics["accuracy"]) == 1.0


def test_method_uses_the_shared_momentum_target_with_its_own_schedule():
    method = methods.get("moco_v3")
    assert isinstance(method, momentum.PredictorMethod) and method.loss_inputs == ("predictions", "targets")
    assert method.loss_kwarg_defaults() == {"temperature": 0.2}
    config = config_lib.load_config_file("configs/moco_v3.py:digits")
    config_lib.validate_config(config, num_devices=8)
    assert (config.momentum.base, config.momentum.final, config.loss.temperature) == (0.99, 1.0, 0.2)
    vit = config_lib.load_config_file("configs/moco_v3.py:imagenet,encoder=vit_small")
    assert vit.optimizer.name == "adamw" and vit.optimizer.lr == 1.5e-4 and vit.loss.temperature == 0.2
    r50 = config_lib.load_config_file("configs/moco_v3.py:imagenet")
    assert r50.optimizer.name == "lars" and r50.loss.temperature == 1.0


def test_bad_momentum_fails_in_config_validation():
    config = config_lib.apply_overrides(config_lib.load_config_file("configs/moco_v3.py:digits"),
                                        {"momentum.base": 1.2})
    with pytest.raises(config_lib.ConfigError, match=r"config\.momentum\.base is 1\.2"):
        config_lib.validate_config(config, num_devices=8)
