"""Tests for clrjax.optim against float64 NumPy references written from the papers."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clrjax import optim
from clrjax.config import base_config


# ---------------------------------------------------------------------------
# LR scaling
# ---------------------------------------------------------------------------
def test_linear_scaling_matches_simclr_rule():
    # SimCLR: LR = 0.3 x BatchSize / 256.
    assert optim.scaled_learning_rate(0.3, 4096, "linear") == pytest.approx(0.3 * 4096 / 256)
    assert optim.scaled_learning_rate(0.1, 64, "linear", base_batch=32) == pytest.approx(0.2)


def test_sqrt_scaling_is_simclr_appendix_rule_without_base_batch():
    # SimCLR B.1: LR = 0.075 x sqrt(BatchSize); base_batch plays no role.
    for batch in (256, 1000, 4096):
        expected = 0.075 * math.sqrt(batch)
        assert optim.scaled_learning_rate(0.075, batch, "sqrt") == pytest.approx(expected, rel=1e-12)
        assert optim.scaled_learning_rate(0.075, batch, "sqrt", base_batch=512) == pytest.approx(
            expected, rel=1e-12)


def test_no_scaling_returns_base_lr():
    assert optim.scaled_learning_rate(2e-3, 4096, "none") == 2e-3


@pytest.mark.parametrize("args", [(0.1, 256, "cubic"), (0.1, 0, "linear"), (0.1, 256, "linear", 0),
                                  (-0.1, 256, "none")])
def test_scaling_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        optim.scaled_learning_rate(*args)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------
def _schedule_reference(t, peak, total, warmup, end):
    """float64 warmup + cosine, written from Goyal et al. / SimCLR (Loshchilov & Hutter)."""
    if t < warmup:
        return peak * t / warmup
    decay = total - warmup
    progress = 1.0 if decay == 0 else min(max((t - warmup) / decay, 0.0), 1.0)
    return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_schedule_values_match_formula_and_optax():
    peak, total, warmup, end = 1.2, 100, 10, 0.01
    schedule = optim.warmup_cosine_schedule(peak, total, warmup, end)
    reference_optax = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, end)
    # step 0, mid-warmup, end of warmup, halfway through decay, last step, after.
    for t in (0, 5, 10, 55, 99, 100, 150):
        expected = _schedule_reference(t, peak, total, warmup, end)
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(float(schedule(t)), float(reference_optax(t)), rtol=1e-5, atol=1e-7)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(55)), (peak + end) / 2, rtol=1e-6)


def test_schedule_is_jittable_with_traced_step():
    schedule = optim.warmup_cosine_schedule(0.5, 20, 4, 0.0)
    values = jax.jit(jax.vmap(schedule))(jnp.arange(21))
    expected = [_schedule_reference(t, 0.5, 20, 4, 0.0) for t in range(21)]
    np.testing.assert_allclose(np.asarray(values), expected, rtol=1e-6, atol=1e-7)


def test_schedule_without_warmup_starts_at_peak():
    schedule = optim.warmup_cosine_schedule(0.8, 50, 0, 0.0)
    for t in (0, 1, 25, 49, 50):
        np.testing.assert_allclose(float(schedule(t)), _schedule_reference(t, 0.8, 50, 0, 0.0),
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(schedule(0)), 0.8, rtol=1e-7)


def test_schedule_with_warmup_only_ends_at_end_lr():
    schedule = optim.warmup_cosine_schedule(0.8, 10, 10, 0.05)
    for t in (0, 3, 9, 10, 11):
        np.testing.assert_allclose(float(schedule(t)), _schedule_reference(t, 0.8, 10, 10, 0.05),
                                   rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(schedule(9)), 0.72, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 0.05, rtol=1e-6)


@pytest.mark.parametrize("args", [(1.0, 0, 0), (1.0, 10, 11), (1.0, 10, -1), (-1.0, 10, 2)])
def test_schedule_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        optim.warmup_cosine_schedule(*args)


# ---------------------------------------------------------------------------
# Weight-decay mask
# ---------------------------------------------------------------------------
class _SmallCNN(nn.Module):
    """Conv-BN-ReLU x2, a 2-D LayerNorm, an embedding and a dense head."""

    @nn.compact
    def __call__(self, x, ids):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=False)(x)
        x = nn.relu(x)
        x = nn.Conv(4, (3, 3), use_bias=False, name="conv2")(x)
        x = nn.BatchNorm(use_running_average=False, name="bn2")(x)
        # A norm whose scale/bias are 2-D: excluded by module name, not by ndim.
        x = nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1), name="proj_ln")(x[:, 0])
        x = x.reshape(x.shape[0], -1) + nn.Embed(10, 4 * 4, name="embed")(ids)
        return nn.Dense(3)(x)


def _init_cnn_params():
    # Shapes and names come from flax (eval_shape: tracing only, no compute);
    # values are random. Eager flax init costs seconds on 2 busy CPU cores.
    abstract = jax.eval_shape(_SmallCNN().init, jax.random.key(0), jnp.zeros((2, 4, 4, 3)),
                              jnp.zeros((2,), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract)


@pytest.fixture(scope="module")
def cnn_params():
    return _init_cnn_params()


def test_mask_on_cnn_with_batchnorm(cnn_params):
    params = cnn_params
    mask = optim.weight_decay_mask(params)
    expected = {
        "Conv_0": {"kernel": True, "bias": False},
        "BatchNorm_0": {"scale": False, "bias": False},
        "conv2": {"kernel": True},
        "bn2": {"scale": False, "bias": False},
        "proj_ln": {"scale": False, "bias": False},
        "embed": {"embedding": True},
        "Dense_0": {"kernel": True, "bias": False},
    }
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    assert jax.tree.leaves(mask) == jax.tree.leaves(expected)
    assert params["proj_ln"]["scale"].ndim == 2  # the name rule is what excludes it


def test_mask_module_name_rule_uses_tokens():
    square = np.ones((3, 3))
    params = {"kiln": {"scale": square}, "ln_2": {"scale": square}, "GroupNorm_0": {"bias": square},
              "bn1": {"kernel": square}, "head": {"pos_embedding": np.ones((1, 4, 3)), "temp": 1.0}}
    mask = optim.weight_decay_mask(params)
    assert mask == {"kiln": {"scale": True}, "ln_2": {"scale": False}, "GroupNorm_0": {"bias": False},
                    "bn1": {"kernel": True}, "head": {"pos_embedding": True, "temp": False}}


def test_mask_works_on_abstract_params(cnn_params):
    abstract = jax.eval_shape(lambda: cnn_params)
    assert isinstance(jax.tree.leaves(abstract)[0], jax.ShapeDtypeStruct)
    assert optim.weight_decay_mask(abstract) == optim.weight_decay_mask(cnn_params)


# ---------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------
def _lars_reference(params, grads_per_step, lr_fn, wd, momentum, eta, eps, mask, nesterov):
    """float64 LARS (You et al. 2017; Barlow Twins' LARS with exclude_bias_and_norm)."""
    w = {k: np.asarray(v, np.float64) for k, v in params.items()}
    velocity = {k: np.zeros_like(v) for k, v in w.items()}
    for t, grads in enumerate(grads_per_step):
        for k in w:
            g = np.asarray(grads[k], np.float64)
            if mask[k]:
                g = g + wd * w[k]
                w_norm, g_norm = np.linalg.norm(w[k]), np.linalg.norm(g)
                ratio = eta * w_norm / (g_norm + eps) if (w_norm > 0 and g_norm > 0) else 1.0
                g = g * ratio
            velocity[k] = momentum * velocity[k] + g
            update = momentum * velocity[k] + g if nesterov else velocity[k]
            w[k] = w[k] - lr_fn(t) * update
    return w


@pytest.mark.parametrize("nesterov,eps", [(False, 0.0), (True, 1e-3)])
def test_lars_matches_float64_reference_over_three_steps(nesterov, eps):
    rng = np.random.default_rng(0)
    params = {
        "conv": rng.normal(size=(3, 3, 2, 4)).astype(np.float32),
        "dense": (0.1 * rng.normal(size=(5, 3))).astype(np.float32),
        "bias": rng.normal(size=(3,)).astype(np.float32),       # masked out
        "zero_init": np.zeros((4, 4), np.float32),              # ||w|| = 0 at step 0
    }
    mask = {"conv": True, "dense": True, "bias": False, "zero_init": True}
    grads_per_step = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
                      for _ in range(3)]
    # A schedule that changes every step, so the order "momentum, then lr" is tested.
    lr_values = [0.5, 1.5, 0.25]
    lr_fn = lambda count: jnp.asarray(lr_values)[count]  # noqa: E731
    wd, momentum, eta = 0.05, 0.9, 0.1

    tx = optim.lars(lr_fn, weight_decay=wd, momentum=momentum, trust_coefficient=eta, eps=eps,
                    mask=mask, nesterov=nesterov)
    jparams = jax.tree.map(jnp.asarray, params)
    state = tx.init(jparams)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for grads in grads_per_step:
        jparams, state = step(jparams, state, jax.tree.map(jnp.asarray, grads))

    expected = _lars_reference(params, grads_per_step, lambda t: lr_values[t], wd, momentum, eta,
                               eps, mask, nesterov)
    for k in params:
        delta, expected_delta = np.asarray(jparams[k], np.float64) - params[k], expected[k] - params[k]
        assert np.abs(expected_delta).max() > 1e-3, k  # the comparison below is not vacuous
        np.testing.assert_allclose(delta, expected_delta, rtol=2e-4, atol=2e-6, err_msg=k)


def test_lars_trust_ratio_is_one_for_zero_gradient_and_zero_weight():
    tx = optim.scale_by_layerwise_trust_ratio(trust_coefficient=0.01)
    params = {"zero_w": jnp.zeros((2, 2)), "w": jnp.ones((2, 2))}
    updates = {"zero_w": jnp.full((2, 2), 3.0), "w": jnp.zeros((2, 2))}
    scaled, _ = tx.update(updates, tx.init(params), params)
    np.testing.assert_array_equal(scaled["zero_w"], updates["zero_w"])
    np.testing.assert_array_equal(scaled["w"], updates["w"])
    assert np.all(np.isfinite(scaled["w"]))


def test_lars_default_mask_scales_every_leaf():
    params = {"b": jnp.array([3.0, 4.0])}
    grads = {"b": jnp.array([0.0, 10.0])}
    tx = optim.lars(1.0, momentum=0.0, trust_coefficient=0.1)
    updates, _ = tx.update(grads, tx.init(params), params)
    # ratio = 0.1 * 5 / 10 = 0.05
    np.testing.assert_allclose(updates["b"], [0.0, -0.5], rtol=1e-6)


# ---------------------------------------------------------------------------
# build_optimizer
# ---------------------------------------------------------------------------
def _base_cfg(name, **overrides):
    cfg = {"name": name, "lr": 0.3, "lr_scaling": "linear", "base_batch": 256, "weight_decay": 1e-2,
           "momentum": 0.9, "nesterov": False, "trust_coefficient": 0.001, "b1": 0.9, "b2": 0.999,
           "warmup_epochs": 0.0, "end_lr": 0.0, "grad_clip_norm": None}
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer_one_update_is_finite_and_respects_mask(name, cnn_params):
    params = cnn_params
    tx, schedule = optim.build_optimizer(_base_cfg(name, grad_clip_norm=1.0), global_batch=512,
                                         total_steps=100, steps_per_epoch=10)
    state = tx.init(params)
    # Zero gradients: only weight decay moves anything, so masked-out leaves must stay put.
    grads = jax.tree.map(jnp.zeros_like, params)
    update = jax.jit(tx.update)
    updates, state = update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    mask = optim.weight_decay_mask(params)
    for (path, new), old, decayed in zip(jax.tree_util.tree_leaves_with_path(new_params),
                                         jax.tree.leaves(params), jax.tree.leaves(mask)):
        assert np.all(np.isfinite(new)), path
        if decayed:
            assert np.any(new != old), path
        else:
            np.testing.assert_array_equal(new, old, err_msg=str(path))
    # Random gradients also give finite parameters.
    rng = np.random.default_rng(1)  # NumPy: eager jax.random compiles once per shape (slow)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates, _ = update(grads, state, params)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(optax.apply_updates(params, updates)))


def test_build_optimizer_schedule_uses_scaled_lr_and_warmup_epochs():
    _, schedule = optim.build_optimizer(_base_cfg("lars", warmup_epochs=2.5, end_lr=0.001),
                                        global_batch=1024, total_steps=100, steps_per_epoch=4)
    peak = 0.3 * 1024 / 256
    np.testing.assert_allclose(float(optim.current_learning_rate(schedule, 10)), peak, rtol=1e-6)
    np.testing.assert_allclose(float(optim.current_learning_rate(schedule, 5)), peak / 2, rtol=1e-6)
    np.testing.assert_allclose(float(optim.current_learning_rate(schedule, 100)), 0.001, rtol=1e-5)


def _config_optimizer(**overrides):
    """The optimizer fields of clrjax.config.base_config(), the only place defaults live."""
    return {**base_config().optimizer.to_dict(), **overrides}


def test_build_optimizer_accepts_config_dict_and_defaults():
    ml_collections = pytest.importorskip("ml_collections")
    cfg = ml_collections.ConfigDict(_config_optimizer(name="sgd", lr=0.1, lr_scaling="none",
                                                      weight_decay=0.0, warmup_epochs=0.0))
    tx, schedule = optim.build_optimizer(cfg, global_batch=8, total_steps=10, steps_per_epoch=5)
    np.testing.assert_allclose(float(schedule(0)), 0.1, rtol=1e-6)  # no scaling, no warmup
    params = {"w": jnp.ones((2, 2))}
    updates, _ = tx.update({"w": jnp.ones((2, 2))}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones((2, 2)), rtol=1e-6)


@pytest.mark.parametrize("overrides,field", [
    ({"name": "adam"}, "name"),
    ({"lr_scaling": "cubic"}, "lr_scaling"),
    ({"momentum": 1.5}, "momentum"),
    ({"lr": 0.0}, "opt_cfg.lr "),
    ({"lr": "0.3"}, "opt_cfg.lr "),
    ({"weight_decay": -1e-4}, "weight_decay"),
    ({"b2": 1.0}, "b2"),
    ({"warmup_epochs": 11.0}, "warmup_epochs"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"learning_rate": 0.1}, "learning_rate"),
])
def test_build_optimizer_rejects_bad_config_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        optim.build_optimizer({**_base_cfg("lars"), **overrides}, global_batch=256,
                              total_steps=100, steps_per_epoch=10)


def test_build_optimizer_rejects_missing_field_and_bad_step_counts():
    with pytest.raises(ValueError, match="opt_cfg.lr is missing"):
        optim.build_optimizer({"name": "sgd"}, global_batch=8, total_steps=10, steps_per_epoch=5)
    without_decay = {k: v for k, v in _config_optimizer().items() if k != "weight_decay"}
    with pytest.raises(ValueError, match="opt_cfg.weight_decay is missing"):  # no library fallback
        optim.build_optimizer(without_decay, global_batch=8, total_steps=10, steps_per_epoch=5)
    with pytest.raises(ValueError, match="total_steps"):
        optim.build_optimizer(_config_optimizer(name="sgd", lr=0.1), global_batch=8, total_steps=0,
                              steps_per_epoch=5)
