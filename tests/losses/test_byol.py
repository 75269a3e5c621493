"""BYOL (Grill et al. 2020): loss against float64, the momentum schedule and EMA against NumPy,
and the target network: never a gradient, never in the online batch statistics, never exported.

The shared harness (tests/methods/test_harness.py) covers devices, pmap,
8-vs-1-device train steps and resume; this file covers what is BYOL's own.

Tolerances: VALUE_RTOL 1e-5 (float32 vs float64, relative to the largest
entry), GRAD_RTOL 1e-4; the EMA replay 1e-6 (float32 EMA vs float64 replay
of the same online parameters).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib, methods, parallel, train
from clrjax.data import pipeline
from clrjax.losses import byol_loss
from clrjax.methods import momentum
from clrjax.methods.base import Method
from tests.losses import reference
from tests.losses.cases import assert_close
from tests.methods.test_harness import tiny_config

N, D = 12, 6
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _four(seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(N, D))
    return [base + 0.7 * rng.normal(size=(N, D)) for _ in range(4)]  # p_a, p_b, t_a, t_b, correlated


def test_loss_and_gradient_match_float64_reference_and_no_gradient_reaches_the_target():
    arrays = _four()
    loss, metrics = byol_loss(*map(jnp.float32, arrays))
    assert_close(loss, reference.byol(*arrays), VALUE_RTOL, "loss")
    units = [a / np.linalg.norm(a, axis=1, keepdims=True) for a in arrays]
    cosine = (np.sum(units[0] * units[3], 1) + np.sum(units[1] * units[2], 1)).sum() / (2 * N)
    assert_close(metrics["cosine"], cosine, VALUE_RTOL, "cosine")
    grads = jax.grad(lambda *a: byol_loss(*a)[0], argnums=(0, 1, 2, 3))(*map(jnp.float32, arrays))
    with jax.enable_x64(True):
        ref = jax.grad(lambda pa, pb: reference.byol(pa, pb, jnp.asarray(arrays[2]), jnp.asarray(arrays[3]),
                                                     xp=jnp), argnums=(0, 1))(*map(jnp.asarray, arrays[:2]))
    for g, r, what in zip(grads[:2], ref, ("p_a", "p_b")):
        assert np.max(np.abs(r)) > 1e-3
        assert_close(g, r, GRAD_RTOL, what)
    for g in grads[2:]:  # stop_gradient inside the loss
        np.testing.assert_array_equal(g, 0.0)


def test_identical_rows_give_zero_loss_and_scale_is_ignored():
    p_a, p_b, _, _ = map(jnp.float32, _four(1))
    loss, metrics = byol_loss(p_a, p_b, 3.0 * p_b, 0.5 * p_a)  # t_b parallel to p_a, t_a to p_b
    assert abs(float(loss)) < 1e-5 and abs(float(metrics["cosine"]) - 1.0) < 1e-6


def test_mismatched_prediction_and_target_shapes_fail_with_the_fix():
    z = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="config.predictor"):
        byol_loss(z, z, jnp.ones((4, 5)), jnp.ones((4, 5)))


@pytest.mark.parametrize("base,final", [(0.996, 1.0), (0.99, 1.0), (0.999, 0.999)])
def test_momentum_schedule_matches_numpy(base, final):
    total = 37
    k = np.arange(total + 1)
    tau = np.asarray(jax.vmap(lambda s: momentum.momentum_at(s, total, base, final))(jnp.asarray(k)))
    np.testing.assert_allclose(tau, reference.target_momentum(k, total, base, final), rtol=0, atol=1e-7)
    assert abs(tau[0] - base) < 1e-7 and abs(tau[-1] - final) < 1e-7
    assert np.all(np.diff(tau) >= -1e-7)  # never decreases


def _tiny_byol(**overrides):
    return tiny_config("byol", **{"predictor.hidden_dims": (32,), "num_steps": 4, **overrides})


def test_after_update_is_the_ema_with_the_scheduled_momentum():
    config = _tiny_byol()
    exp = train.build_experiment(config, parallel.make_mesh(jax.devices()[:1]))
    state = jax.device_get(train.init_train_state(exp))
    method = exp.method
    rng = np.random.default_rng(0)
    online = jax.tree.map(lambda a: a + rng.normal(size=a.shape).astype(np.float32), state.params)
    stats = jax.tree.map(lambda a: a + rng.uniform(size=a.shape).astype(np.float32), state.batch_stats)
    step, total = 3, 10
    new = method.after_update(state.method_state, params=online, batch_stats=stats, step=jnp.int32(step),
                              total_steps=total)
    tau = reference.target_momentum(step - 1, total, config.momentum.base, config.momentum.final)
    expected = {"params": {m: online[m] for m in ("encoder", "projector")},
                "batch_stats": {m: stats[m] for m in ("encoder", "projector") if m in stats}}
    expected = jax.tree.map(lambda t, o: tau * np.float64(t) + (1 - tau) * np.float64(o),
                            state.method_state["target"], expected)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), new["target"], expected)
    assert "predictor" not in new["target"]["params"] and "probe" not in new["target"]["params"]


def test_target_batch_norm_statistics_do_not_leak_into_the_online_ones():
    config = _tiny_byol()
    exp = train.build_experiment(config, parallel.make_mesh(jax.devices()[:1]))
    state = train.init_train_state(exp)
    target = state.method_state["target"]
    shifted = dict(state.method_state, target={"params": jax.tree.map(lambda a: 3.0 * a + 0.1, target["params"]),
                                               "batch_stats": target["batch_stats"]})
    views = jax.random.normal(jax.random.PRNGKey(0), (8, 2) + train.model_input_shape(exp))
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    outputs, stats = exp.method.forward(exp.model, variables, views, shifted, train=True)
    online_only, online_stats = Method.forward(exp.method, exp.model, variables, views, shifted, train=True)
    jax.tree.map(np.testing.assert_array_equal, stats, online_stats)
    assert outputs["targets"].shape == outputs["predictions"].shape == (8, 2, config.projector.out_dim)
    assert not np.allclose(outputs["targets"], online_only["embeddings"])  # the target really ran


def test_target_starts_as_the_online_networks_and_changes_only_through_the_ema():
    """Train 3 steps; replay the EMA of the recorded online variables in float64 from the step-0 copy:
    the target equals it, so no gradient or optimizer update ever reached the target."""
    config = _tiny_byol(num_steps=3, **{"momentum.base": 0.5})  # a fast EMA: every step moves the target
    exp = train.build_experiment(config, parallel.make_mesh(jax.devices()[:1]))
    state = train.init_train_state(exp)
    host = jax.device_get(state)
    pick = momentum.target_subtrees
    np64 = lambda t: jax.tree.map(np.float64, t)  # noqa: E731
    replay = {"params": np64(pick(host.params)), "batch_stats": np64(pick(host.batch_stats))}
    jax.tree.map(np.testing.assert_array_equal, host.method_state["target"], replay)  # step 0: a copy
    assert "target" not in host.params and set(host.params) == {"encoder", "projector", "predictor", "probe"}
    step_fn = train.make_train_step(exp)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    for k in range(exp.total_steps):
        state, _ = step_fn(state, parallel.host_to_global(train.model_batch(next(loader)), exp.mesh))
        host = jax.device_get(state)
        tau = reference.target_momentum(k, exp.total_steps, 0.5, 1.0)
        online = {"params": np64(pick(host.params)), "batch_stats": np64(pick(host.batch_stats))}
        replay = jax.tree.map(lambda t, o: tau * t + (1 - tau) * o, replay, online)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                     host.method_state["target"], replay)
    loader.close()
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), host.params["encoder"],
                         host.method_state["target"]["params"]["encoder"])
    assert max(jax.tree.leaves(moved)) > 0, "online and target encoders must differ: the online one is evaluated"
    # What is evaluated and exported holds the online encoder's values (a gathered copy under FSDP).
    jax.tree.map(np.testing.assert_array_equal, train.encoder_variables_of(host)["params"]["encoder"],
                 host.params["encoder"])


@pytest.mark.parametrize("overrides,field", [
    ({"momentum.base": 1.0}, "config.momentum.base"),
    ({"momentum.base": -0.1}, "config.momentum.base"),
    ({"momentum.base": 0.99, "momentum.final": 0.9}, "config.momentum.final"),
    ({"momentum.final": 1.5}, "config.momentum.final"),
])
def test_bad_momentum_fails_in_config_validation(overrides, field):
    config = config_lib.apply_overrides(config_lib.load_config_file("configs/byol.py:digits"), overrides)
    with pytest.raises(config_lib.ConfigError, match=field.replace(".", r"\.")) as err:
        config_lib.validate_config(config, num_devices=8)
    assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")  # one sentence


def test_byol_is_registered_with_its_loss_inputs():
    method = methods.get("byol")
    assert method.loss_inputs == ("predictions", "targets") and method.loss_kwarg_defaults() == {}
