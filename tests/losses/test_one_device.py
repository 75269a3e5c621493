"""axis_name=None: each loss equals the float64 reference of its paper definition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.losses import simclr_loss
from tests.losses import reference
from tests.losses.cases import ONE_DEVICE, TEMPERATURE, assert_close, embeddings, running_cov

N, D = 12, 6
VALUE_RTOL = 1e-5  # float32 vs float64 on O(1) losses with highest matmul precision
GRAD_RTOL = 1e-4  # relative to the largest gradient entry


@pytest.mark.parametrize("case", ONE_DEVICE, ids=repr)
def test_value_and_new_cov_match_float64_reference(case):
    z_a, z_b = embeddings(N, D)
    cov = running_cov(D)
    loss, new_cov, metrics = case.run(jnp.float32(z_a), jnp.float32(z_b), jnp.float32(cov), None)
    ref_loss, ref_cov, ref_metrics = case.ref(z_a, z_b, cov)
    assert_close(loss, ref_loss, VALUE_RTOL, "loss")
    if ref_cov is not None:
        assert_close(new_cov, ref_cov, VALUE_RTOL, "new_cov")
    for name, value in ref_metrics.items():
        assert_close(metrics[name], value, VALUE_RTOL, name)
    for name, value in reference.collapse_monitors(z_a).items():
        assert_close(metrics[name], value, 1e-4, name)  # SVD in float32


@pytest.mark.parametrize("case", ONE_DEVICE, ids=repr)
def test_gradient_matches_float64_autodiff_of_reference(case):
    z_a, z_b = embeddings(N, D, seed=3)
    cov = running_cov(D)

    def loss32(a, b):
        return case.run(a, b, jnp.float32(cov), None)[0]

    grads32 = jax.grad(loss32, argnums=(0, 1))(jnp.float32(z_a), jnp.float32(z_b))
    with jax.enable_x64(True):
        grads64 = jax.grad(lambda a, b: case.ref(a, b, jnp.asarray(cov), xp=jnp)[0],
                           argnums=(0, 1))(jnp.asarray(z_a), jnp.asarray(z_b))
        grads64 = [np.asarray(g) for g in grads64]
    assert np.max(np.abs(grads64[0])) > 1e-3  # the comparison is not vacuous
    for g32, g64 in zip(grads32, grads64):
        assert_close(g32, g64, GRAD_RTOL)


def test_simclr_metrics_match_reference():
    z_a, z_b = embeddings(16, 5, seed=7)
    _, metrics = simclr_loss(jnp.float32(z_a), jnp.float32(z_b), temperature=TEMPERATURE)
    for name, value in reference.simclr_metrics(z_a, z_b, TEMPERATURE).items():
        assert_close(metrics[name], value, VALUE_RTOL, name)
    assert 0.0 < float(metrics["accuracy"]) < 1.0  # random views: neither trivial extreme


def test_monitors_do_not_change_gradients():
    z_a, z_b = embeddings(N, D, seed=4)

    def loss(a, monitors):
        return simclr_loss(a, jnp.float32(z_b), monitors=monitors)[0]

    with_monitors = jax.grad(loss)(jnp.float32(z_a), True)
    without = jax.grad(loss)(jnp.float32(z_a), False)
    np.testing.assert_array_equal(with_monitors, without)
