"""siglip_loss: the float64 reference of Zhai et al. 2023 eq. 1, the ppermute ring vs 1 device.

Tolerances: values 1e-5 and gradients 1e-4 relative to the largest entry
(float32 with highest matmul precision vs float64); 1e-5 between device counts
and layouts (float32 both, different summation order), 1e-4 for the log_t
gradient, a sum of N^2 O(1) terms that cancels.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clrjax.losses import siglip_loss
from clrjax.losses.siglip import INIT_BIAS, INIT_LOG_T
from tests.losses import reference_image_text as ref
from tests.losses.cases import assert_close

N, D = 16, 8  # n_local = 2 on 8 devices
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4
LAYOUT_RTOLS = {"img": 1e-5, "txt": 1e-5, "log_t": 1e-4, "bias": 1e-5}
NAMES = ("img", "txt", "log_t", "bias")
PARAMS = [(INIT_LOG_T, INIT_BIAS), (1.0, 0.3)]  # the paper's init; and one where positives dominate


def _f32(*arrays):
    return [jnp.float32(a) for a in arrays]


@functools.lru_cache(maxsize=None)
def _value_and_grads():
    """jit(value_and_grad) of the one-device loss w.r.t. img, txt, log_t and bias."""
    return jax.jit(jax.value_and_grad(siglip_loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("log_t,bias", PARAMS)
def test_value_and_metrics_match_float64_reference(log_t, bias):
    img, txt = ref.image_text_pairs(N, D, seed=1)
    (loss, metrics), _ = _value_and_grads()(*_f32(img, txt, log_t, bias))
    assert_close(loss, ref.siglip(img, txt, log_t, bias), VALUE_RTOL, "loss")
    expected = ref.siglip_metrics(img, txt, log_t, bias)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert_close(metrics[name], value, VALUE_RTOL, name)
    assert 0.0 < float(metrics["t2i_accuracy"]) < 1.0  # neither trivial extreme


def test_gradients_match_float64_autodiff_of_reference():
    log_t, bias = PARAMS[0]  # the paper's init; the 1-vs-K gradient tests use PARAMS[1]
    img, txt = ref.image_text_pairs(N, D, seed=2)
    _, grads32 = _value_and_grads()(*_f32(img, txt, log_t, bias))
    with jax.enable_x64(True):
        grads64 = jax.grad(lambda *a: ref.siglip(*a, xp=jnp), argnums=(0, 1, 2, 3))(
            *(jnp.asarray(a, jnp.float64) for a in (img, txt, log_t, bias)))
        grads64 = [np.asarray(g) for g in grads64]
    for name, g32, g64 in zip(NAMES, grads32, grads64):
        assert np.max(np.abs(g64)) > 1e-3, name  # not vacuous
        assert_close(g32, g64, GRAD_RTOL, name)


def test_extreme_logits_stay_finite():
    """A confident pair (t = 1000): log sigmoid of logits near +-1000 is finite, as is its gradient."""
    img, txt = ref.image_text_pairs(N, D, seed=3, noise=0.0)
    (loss, _), grads = _value_and_grads()(*_f32(img, txt, math.log(1000.0), 0.0))
    assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in grads)
    assert_close(loss, ref.siglip(img, txt, math.log(1000.0), 0.0), VALUE_RTOL, "loss")


def _sharded(k, impl, args):
    """Every shard's loss and metrics, and the gradient of the global loss, under shard_map."""
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))

    def per_shard(img, txt, log_t, bias):
        loss, metrics = siglip_loss(img, txt, log_t, bias, axis_name="data", impl=impl)
        return loss[None], jax.tree.map(lambda m: m[None], metrics)  # each shard's copy

    rows = P("data")
    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(rows, rows, P(), P()),
                           out_specs=(rows, rows))

    def mean_over_shards(*a):
        losses, metrics = mapped(*a)
        return jnp.mean(losses), (losses, metrics)

    (_, aux), grads = jax.jit(jax.value_and_grad(mean_over_shards, argnums=(0, 1, 2, 3),
                                                 has_aux=True))(*args)
    return aux, grads


@pytest.mark.parametrize("k,impl", [(1, "ppermute"), (2, "ppermute"), (4, "ppermute"),
                                    (8, "ppermute"), (8, "all_gather")])
def test_shard_map_equals_one_device(k, impl):
    """Value, metrics and gradients through the ring's ppermute (and the gather) equal 1 device."""
    img, txt = ref.image_text_pairs(N, D, seed=4)
    args = _f32(img, txt, *PARAMS[1])
    (loss, metrics), grads = _value_and_grads()(*args)
    (losses, shard_metrics), shard_grads = _sharded(k, impl, args)
    np.testing.assert_array_equal(losses, np.full(k, losses[0]))  # one global value
    assert_close(losses[0], loss, VALUE_RTOL, "loss")
    for name, value in metrics.items():
        np.testing.assert_array_equal(shard_metrics[name], np.full(k, shard_metrics[name][0]))
        assert_close(shard_metrics[name][0], value, VALUE_RTOL, name)
    for name, g, sg in zip(NAMES, grads, shard_grads):
        assert np.max(np.abs(g)) > 0
        assert_close(sg, g, LAYOUT_RTOLS[name], name)


def test_pmap_pmean_of_replicated_parameter_gradients():
    """A pmap train step: towers x @ W replicated; pmean of the W, log_t and bias gradients."""
    k = 8
    x_img, x_txt = _f32(*ref.image_text_pairs(N, D, seed=5))
    rng = np.random.default_rng(6)
    params = _f32(*(rng.normal(size=(2, D, D)) / np.sqrt(D)), *PARAMS[0])

    def loss_of(params, x_img, x_txt, axis_name):
        w_i, w_t, log_t, bias = params
        return siglip_loss(x_img @ w_i, x_txt @ w_t, log_t, bias, axis_name=axis_name)[0]

    loss, grads = jax.jit(jax.value_and_grad(loss_of), static_argnums=3)(params, x_img, x_txt,
                                                                         None)

    def device_step(params, x_img, x_txt):
        value, g = jax.value_and_grad(loss_of)(params, x_img, x_txt, "data")
        return value, jax.lax.pmean(g, "data")

    replicate = lambda a: jnp.broadcast_to(a, (k,) + a.shape)  # noqa: E731
    values, device_grads = jax.pmap(device_step, axis_name="data", devices=jax.devices()[:k])(
        [replicate(p) for p in params], x_img.reshape(k, N // k, D), x_txt.reshape(k, N // k, D))
    for device in range(k):
        assert_close(values[device], loss, VALUE_RTOL, "loss")
        for name, g, dg in zip(("W_img", "W_txt", "log_t", "bias"), grads, device_grads):
            assert_close(dg[device], g, 1e-4 if name == "log_t" else 1e-5, name)


def _compiled_loss_and_grad(impl, n_global=2048, dim=16, k=8):
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))
    mapped = jax.shard_map(
        lambda *a: siglip_loss(*a, axis_name="data", impl=impl)[0], mesh=mesh,
        in_specs=(P("data"), P("data"), P(), P()), out_specs=P())
    z = jax.ShapeDtypeStruct((n_global, dim), jnp.float32)
    s = jax.ShapeDtypeStruct((), jnp.float32)
    return jax.jit(jax.value_and_grad(mapped, argnums=(0, 1, 2, 3))).lower(z, z, s, s).compile()


def test_ring_moves_text_blocks_by_ppermute_and_bounds_temporaries():
    """n = 256 rows per device: the ring's temporaries stay O(n^2), the gather's are O(n N)."""
    ring, gathered = _compiled_loss_and_grad("ppermute"), _compiled_loss_and_grad("all_gather")
    hlo = ring.as_text()
    assert "collective-permute" in hlo and "all-gather" not in hlo
    n, n_global = 256, 2048
    block = n * n * 4  # one f32 n x n block: 256 KiB
    ring_temp = ring.memory_analysis().temp_size_in_bytes
    gathered_temp = gathered.memory_analysis().temp_size_in_bytes
    assert gathered_temp >= n * n_global * 4  # holds at least one [n, N] block
    assert ring_temp < 8 * block, (ring_temp, block)  # a few n x n buffers, not [n, N]
    assert ring_temp < gathered_temp / 3, (ring_temp, gathered_temp)


@pytest.mark.parametrize("kwargs,message", [
    (dict(img=jnp.ones((4, 3)), txt=jnp.ones((4, 5))), "img and txt must have the same shape"),
    (dict(img=jnp.ones((4,)), txt=jnp.ones((4,))), "2-D"),
    (dict(bias=jnp.zeros((1,))), r"bias must be a scalar"),
    (dict(log_t=jnp.zeros((2,))), r"log_t must be a scalar"),
    (dict(impl="dense"), "impl must be one of"),
])
def test_bad_arguments_raise(kwargs, message):
    args = dict(img=jnp.ones((4, 3)), txt=jnp.ones((4, 3)), log_t=INIT_LOG_T, bias=INIT_BIAS)
    args.update(kwargs)
    impl = args.pop("impl", "ppermute")
    with pytest.raises(ValueError, match=message):
        siglip_loss(args["img"], args["txt"], args["log_t"], args["bias"], impl=impl)
