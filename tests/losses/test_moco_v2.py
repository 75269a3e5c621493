"""MoCo v2: loss against float64, the queue against a NumPy ring buffer (wrap-around included),
the queue's content after several steps identical on 1, 2 and 8 devices, and the queue-size check.

The shared harness (tests/methods) covers gradients, pmap, train steps and resume (queue included).
Tolerances: VALUE_RTOL 1e-5 relative to the largest entry, GRAD_RTOL 1e-4.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clrjax import config as config_lib, methods
from clrjax.losses import moco_v2_loss
from clrjax.losses.moco_v2 import enqueue
from tests.losses import reference
from tests.losses.cases import assert_close

N, D, K = 8, 4, 16  # K = 2N: the third step wraps around
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _data(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    queue = rng.normal(size=(K, D))
    queue /= np.linalg.norm(queue, axis=1, keepdims=True)
    q = rng.normal(size=(steps, N, D))
    return queue, q, q + 0.5 * rng.normal(size=(steps, N, D))


def test_loss_gradient_and_queue_match_numpy_over_steps_with_wrap_around():
    queue, qs, ks = _data()
    queue32, ptr32, queue64, ptr64 = jnp.float32(queue), jnp.int32(0), queue, 0
    for q, k in zip(qs, ks):
        loss, _ = moco_v2_loss(jnp.float32(q), jnp.float32(k), queue32, temperature=0.2)
        assert_close(loss, reference.moco_v2(q, k, queue64, 0.2), VALUE_RTOL, "loss")
        grad = jax.grad(lambda v: moco_v2_loss(v, jnp.float32(k), queue32)[0])(jnp.float32(q))
        with jax.enable_x64(True):
            ref = jax.grad(lambda v: reference.moco_v2(v, jnp.asarray(k), jnp.asarray(queue64), 0.2, xp=jnp))(
                jnp.asarray(q))
        assert_close(grad, ref, GRAD_RTOL, "gradient")
        queue32, ptr32 = enqueue(queue32, ptr32, jnp.float32(k))
        queue64, ptr64 = reference.moco_v2_enqueue(queue64, ptr64, k)
        assert_close(queue32, queue64, VALUE_RTOL, "queue")
        assert int(ptr32) == ptr64
    assert ptr64 == N  # 3 batches into a queue of 2: wrapped once


def test_no_gradient_reaches_keys_or_queue():
    queue, qs, ks = _data()
    grads = jax.grad(lambda q, k, Q: moco_v2_loss(q, k, Q)[0], argnums=(1, 2))(
        jnp.float32(qs[0]), jnp.float32(ks[0]), jnp.float32(queue))
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.parametrize("devices", [2, 8])
def test_queue_after_several_steps_is_identical_on_any_device_count(devices):
    """The method's loss + enqueue under shard_map: queue and pointer bit-identical to one device."""
    method = methods.get("moco_v2")
    config = config_lib.load_config_file("configs/moco_v2.py:digits")
    config.projector.out_dim, config.queue.size = D, K
    state = method.init_state(config, {})
    _, qs, ks = _data(seed=1, steps=4)
    batch = {"label": jnp.zeros(N, jnp.int32), "index": jnp.arange(N, dtype=jnp.int32)}
    mesh = Mesh(np.asarray(jax.devices()[:devices]), ("data",))
    sharded = jax.jit(jax.shard_map(lambda o, b, s: method.loss(o, b, s, axis_name="data", temperature=0.2),
                                    mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=(P(), P(), P())))
    one, many = state, state
    for q, k in zip(qs, ks):
        outputs = {"embeddings": jnp.float32(np.stack([q, q], 1)), "targets": jnp.float32(np.stack([k, k], 1))}
        loss1, one, _ = jax.jit(lambda o, b, s: method.loss(o, b, s, temperature=0.2))(outputs, batch, one)
        loss_k, many, _ = sharded(outputs, batch, many)
        assert_close(loss_k, loss1, VALUE_RTOL, "loss")
    np.testing.assert_array_equal(many["queue"], one["queue"])
    assert int(many["queue_ptr"]) == int(one["queue_ptr"]) == (4 * N) % K


@pytest.mark.parametrize("size", [1000, 0, -256])
def test_queue_size_not_a_multiple_of_the_batch_fails_in_config_validation(size):
    config = config_lib.apply_overrides(config_lib.load_config_file("configs/moco_v2.py:digits"),
                                        {"queue.size": size})
    with pytest.raises(config_lib.ConfigError, match=r"config\.queue\.size is .*multiple of 256") as err:
        config_lib.validate_config(config, num_devices=8)
    assert ". " not in str(err.value)


def test_queue_starts_as_unit_rows_from_the_seed():
    method = methods.get("moco_v2")
    config = config_lib.load_config_file("configs/moco_v2.py:digits")
    a, b = method.init_state(config, {}), method.init_state(config, {})
    assert a["queue"].shape == (config.queue.size, config.projector.out_dim) and int(a["queue_ptr"]) == 0
    np.testing.assert_allclose(np.linalg.norm(a["queue"], axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(a["queue"], b["queue"])
    assert float(a["momentum"]["base"]) == float(a["momentum"]["final"]) == np.float32(0.99)
