"""clip_loss: the float64 reference of Radford et al. 2021, the 100 cap, chunking, 1 vs K devices.

Tolerances: values 1e-5 and gradients 1e-4 relative to the largest entry
(float32 with highest matmul precision vs float64); 1e-5 between layouts
(float32 both, different summation order), except 1e-4 for the logit_scale
gradient between layouts: a sum of N^2 O(1) terms that cancels to O(0.1).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clrjax.losses import clip_loss
from clrjax.losses.clip import INIT_LOGIT_SCALE
from tests.losses import reference_image_text as ref
from tests.losses.cases import assert_close

N, D = 16, 8  # n_local = 2 on 8 devices
VALUE_RTOL, GRAD_RTOL, LAYOUT_RTOL = 1e-5, 1e-4, 1e-5
LAYOUT_RTOLS = {"img": LAYOUT_RTOL, "txt": LAYOUT_RTOL, "logit_scale": 1e-4}
LOG_CAP32 = float(np.float32(math.log(100.0)))  # log 100 as a float32 parameter holds it


def _f32(*arrays):
    return [jnp.float32(a) for a in arrays]


@functools.lru_cache(maxsize=None)
def _value_and_grads(chunk_size=None):
    """jit(value_and_grad) of the one-device loss w.r.t. img, txt and logit_scale."""
    def loss(img, txt, logit_scale):
        return clip_loss(img, txt, logit_scale, chunk_size=chunk_size)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@pytest.mark.parametrize("logit_scale", [INIT_LOGIT_SCALE, 1.0, math.log(250.0)])
def test_value_and_metrics_match_float64_reference(logit_scale):
    img, txt = ref.image_text_pairs(N, D, seed=1)
    (loss, metrics), _ = _value_and_grads()(*_f32(img, txt, logit_scale))
    assert_close(loss, ref.clip(img, txt, logit_scale), VALUE_RTOL, "loss")
    expected = ref.clip_metrics(img, txt, logit_scale)
    assert set(metrics) == set(expected)
    for name, value in expected.items():
        assert_close(metrics[name], value, VALUE_RTOL, name)
    assert 0.0 < float(metrics["i2t_accuracy"]) < 1.0  # neither trivial extreme


def test_gradients_match_float64_autodiff_of_reference():
    img, txt = ref.image_text_pairs(N, D, seed=2)
    logit_scale = 1.5  # below the cap: every gradient is the plain one
    _, grads32 = _value_and_grads()(*_f32(img, txt, logit_scale))
    with jax.enable_x64(True):
        grads64 = jax.grad(lambda i, t, s: ref.clip(i, t, s, xp=jnp), argnums=(0, 1, 2))(
            jnp.asarray(img), jnp.asarray(txt), jnp.asarray(logit_scale))
        grads64 = [np.asarray(g) for g in grads64]
    assert abs(grads64[2]) > 1e-3 and np.max(np.abs(grads64[0])) > 1e-3  # not vacuous
    for name, g32, g64 in zip(("img", "txt", "logit_scale"), grads32, grads64):
        assert_close(g32, g64, GRAD_RTOL, name)


def test_scale_is_capped_at_100_with_zero_gradient_above_the_cap():
    img, txt = ref.image_text_pairs(N, D, seed=3)
    (at_cap, _), grads_at_cap = _value_and_grads()(*_f32(img, txt, LOG_CAP32))
    (above, metrics), grads_above = _value_and_grads()(*_f32(img, txt, LOG_CAP32 + 0.7))
    assert_close(above, ref.clip(img, txt, math.log(100.0)), VALUE_RTOL, "loss at scale 100")
    assert float(metrics["scale"]) == pytest.approx(100.0, rel=1e-6)
    assert float(grads_above[2]) == 0.0  # the multiplier is constant above the cap
    np.testing.assert_array_equal(above, at_cap)
    for g_above, g_at in zip(grads_above[:2], grads_at_cap[:2]):
        np.testing.assert_array_equal(g_above, g_at)
    # Exactly at the cap (where open_clip's clamp leaves the parameter) the whole
    # left derivative flows: the float64 derivative of the uncapped definition.
    with jax.enable_x64(True):
        def uncapped(s):
            u = img / np.linalg.norm(img, axis=1, keepdims=True)
            v = txt / np.linalg.norm(txt, axis=1, keepdims=True)
            logits = jnp.exp(s) * (u @ v.T)
            return 0.5 * (jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))
                          + jnp.mean(jax.nn.logsumexp(logits, axis=0) - jnp.diagonal(logits)))
        expected = float(jax.grad(uncapped)(jnp.float64(LOG_CAP32)))
    assert abs(expected) > 1e-2
    assert_close(grads_at_cap[2], expected, GRAD_RTOL, "d loss / d logit_scale at the cap")


@pytest.mark.parametrize("chunk_size", [1, 5, N])  # 5 does not divide N; N is one block
def test_chunked_equals_dense(chunk_size):
    img, txt = ref.image_text_pairs(N, D, seed=4)
    args = _f32(img, txt, INIT_LOGIT_SCALE)
    (loss, metrics), grads = _value_and_grads()(*args)
    (c_loss, c_metrics), c_grads = _value_and_grads(chunk_size)(*args)
    assert_close(c_loss, loss, LAYOUT_RTOL, "loss")
    for name in metrics:
        assert_close(c_metrics[name], metrics[name], LAYOUT_RTOL, name)
    for name, g, cg in zip(("img", "txt", "logit_scale"), grads, c_grads):
        assert_close(cg, g, LAYOUT_RTOLS[name], name)


def _sharded_value_and_grads(k, chunk_size, args):
    """Every shard's loss and metrics, and the gradient of the global loss, under shard_map."""
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))

    def per_shard(img, txt, logit_scale):
        loss, metrics = clip_loss(img, txt, logit_scale, chunk_size=chunk_size, axis_name="data")
        return loss[None], jax.tree.map(lambda m: m[None], metrics)  # each shard's copy

    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                           out_specs=(P("data"), P("data")))

    def mean_over_shards(*a):
        losses, metrics = mapped(*a)
        return jnp.mean(losses), (losses, metrics)

    (_, aux), grads = jax.jit(jax.value_and_grad(mean_over_shards, argnums=(0, 1, 2),
                                                 has_aux=True))(*args)
    return aux, grads


@pytest.mark.parametrize("k,chunk_size", [(2, None), (4, None), (8, None), (2, 3), (8, 3)])
def test_shard_map_equals_one_device(k, chunk_size):
    img, txt = ref.image_text_pairs(N, D, seed=5)
    args = _f32(img, txt, 2.0)
    (loss, metrics), grads = _value_and_grads()(*args)
    (losses, shard_metrics), shard_grads = _sharded_value_and_grads(k, chunk_size, args)
    np.testing.assert_array_equal(losses, np.full(k, losses[0]))  # one global value
    assert_close(losses[0], loss, LAYOUT_RTOL, "loss")
    for name, value in metrics.items():
        np.testing.assert_array_equal(shard_metrics[name], np.full(k, shard_metrics[name][0]))
        assert_close(shard_metrics[name][0], value, LAYOUT_RTOL, name)
    for name, g, sg in zip(("img", "txt", "logit_scale"), grads, shard_grads):
        assert np.max(np.abs(g)) > 0
        assert_close(sg, g, LAYOUT_RTOLS[name], name)


def test_pmap_pmean_of_replicated_parameter_gradients():
    """A pmap train step: towers x @ W replicated, pmean of the W and logit_scale gradients."""
    k, chunk_size = 8, 5
    x_img, x_txt = ref.image_text_pairs(N, D, seed=6)
    rng = np.random.default_rng(7)
    w_img, w_txt = rng.normal(size=(2, D, D)) / np.sqrt(D)
    params = _f32(w_img, w_txt, 2.0)
    x_img, x_txt = _f32(x_img, x_txt)

    def loss_of(params, x_img, x_txt, chunk, axis_name):
        w_i, w_t, logit_scale = params
        return clip_loss(x_img @ w_i, x_txt @ w_t, logit_scale, chunk_size=chunk,
                         axis_name=axis_name)[0]

    loss, grads = jax.jit(jax.value_and_grad(functools.partial(
        loss_of, chunk=None, axis_name=None)))(params, x_img, x_txt)

    def device_step(params, x_img, x_txt):
        value, g = jax.value_and_grad(loss_of)(params, x_img, x_txt, chunk_size, "data")
        return value, jax.lax.pmean(g, "data")

    replicate = lambda a: jnp.broadcast_to(a, (k,) + a.shape)  # noqa: E731
    values, device_grads = jax.pmap(device_step, axis_name="data", devices=jax.devices()[:k])(
        [replicate(p) for p in params], x_img.reshape(k, N // k, D), x_txt.reshape(k, N // k, D))
    for device in range(k):
        assert_close(values[device], loss, LAYOUT_RTOL, "loss")
        for name, g, dg in zip(("W_img", "W_txt", "logit_scale"), grads, device_grads):
            assert_close(dg[device], g, 1e-4 if name == "logit_scale" else LAYOUT_RTOL, name)


def test_bfloat16_inputs_run_in_float32():
    img, txt = (jnp.asarray(a, jnp.bfloat16) for a in ref.image_text_pairs(N, D, seed=8))
    loss, _ = clip_loss(img, txt, jnp.float32(INIT_LOGIT_SCALE))
    assert loss.dtype == jnp.float32
    expected = ref.clip(np.asarray(img, np.float64), np.asarray(txt, np.float64), INIT_LOGIT_SCALE)
    assert_close(loss, expected, VALUE_RTOL, "loss")


@pytest.mark.parametrize("img,txt,logit_scale,message", [
    (jnp.ones((4, 3)), jnp.ones((4, 5)), 1.0, "img and txt must have the same shape"),
    (jnp.ones((4, 3, 1)), jnp.ones((4, 3, 1)), 1.0, "2-D"),
    (jnp.ones((4, 3)), jnp.ones((4, 3)), jnp.ones((1,)), r"logit_scale must be a scalar"),
])
def test_bad_arguments_raise(img, txt, logit_scale, message):
    with pytest.raises(ValueError, match=message):
        clip_loss(img, txt, logit_scale)


@pytest.mark.parametrize("chunk_size", [0, 2.5, True])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        clip_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), 1.0, chunk_size=chunk_size)
