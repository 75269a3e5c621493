"""The core promise: per-shard losses on K devices equal the one-device loss.

For K in {2, 4, 8} simulated CPU devices, with z = x @ W (x row-sharded, W
replicated) plus a zero offset per row (so d loss / d offset is the gradient
w.r.t. every row of z_a and z_b), the shard_map'ed loss must give on every
shard the one-device value, metrics and new_cov, and the same gradients
w.r.t. W and every row. Tolerance: 1e-5 relative to the largest entry
(float32, different summation order).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from tests.losses.cases import MULTI_DEVICE, assert_close, embeddings, running_cov

N, D_IN, D = 16, 10, 16  # D divisible by 8 for column_split; n_local = 2 at K = 8
RTOL = 1e-5


def _inputs(seed=0):
    """W [D_IN, D], x_a, x_b [N, D_IN], zero row offsets [N, D], a PSD cov [D, D]."""
    x_a, x_b = embeddings(N, D_IN, seed)
    w = np.random.default_rng(seed + 1).normal(size=(D_IN, D)) / np.sqrt(D_IN)
    zeros = np.zeros((N, D))
    return [jnp.float32(a) for a in (w, x_a, x_b, zeros, zeros, running_cov(D))]


def _objective(case, axis_name):
    """(W, x_a, x_b, dz_a, dz_b, cov) -> (loss, (new_cov, metrics))."""
    def objective(w, x_a, x_b, dz_a, dz_b, cov):
        loss, new_cov, metrics = case.run(x_a @ w + dz_a, x_b @ w + dz_b, cov, axis_name)
        return loss, (new_cov, metrics)
    return objective


@functools.lru_cache(maxsize=None)
def _one_device(case):
    """One-device value, new_cov, metrics and gradients on the fixed inputs."""
    (loss, (new_cov, metrics)), grads = jax.jit(jax.value_and_grad(
        _objective(case, None), argnums=(0, 3, 4), has_aux=True))(*_inputs())
    return loss, new_cov, metrics, grads


def _sharded(case, args, k):
    """Per-shard values (leading axis K) and the gradient of the global loss."""
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))
    objective = _objective(case, "data")

    def per_shard(*a):
        loss, (new_cov, metrics) = objective(*a)
        # Expose every shard's copy so the test can check they agree.
        return loss[None], (new_cov[None] if new_cov is not None else None,
                            jax.tree.map(lambda m: m[None], metrics))

    rows = P("data")
    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), rows, rows, rows, rows, P()),
                           out_specs=(rows, (rows, rows)))

    def mean_over_shards(*a):
        losses, aux = mapped(*a)
        return jnp.mean(losses), (losses, aux)

    (_, (losses, (new_covs, metrics))), grads = jax.jit(jax.value_and_grad(
        mean_over_shards, argnums=(0, 3, 4), has_aux=True))(*args)
    return losses, new_covs, metrics, grads


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("case", MULTI_DEVICE, ids=repr)
def test_shard_map_equals_one_device(case, k):
    loss, new_cov, metrics, grads = _one_device(case)
    losses, new_covs, shard_metrics, shard_grads = _sharded(case, _inputs(), k)

    assert losses.shape == (k,)
    np.testing.assert_array_equal(losses, np.full(k, losses[0]))  # one global value
    assert_close(losses[0], loss, RTOL, "loss")
    for name, value in metrics.items():
        np.testing.assert_array_equal(shard_metrics[name], np.full(k, shard_metrics[name][0]))
        assert_close(shard_metrics[name][0], value, 1e-4 if name == "rankme" else RTOL, name)
    if new_cov is not None:
        for shard_cov in new_covs:
            np.testing.assert_array_equal(shard_cov, new_covs[0])
        assert_close(new_covs[0], new_cov, RTOL, "new_cov")
    for name, g, sg in zip(("W", "rows of z_a", "rows of z_b"), grads, shard_grads):
        assert np.max(np.abs(g)) > 0
        assert_close(sg, g, RTOL, name)


@pytest.mark.parametrize("case", MULTI_DEVICE[::2], ids=repr)  # one layout per method
def test_pmap_pmean_of_replicated_param_gradient(case):
    """Under pmap each device differentiates its own copy; pmean gives the W gradient."""
    k = 4
    w, x_a, x_b, _, _, cov = _inputs()
    loss, _, _, (w_grad, _, _) = _one_device(case)
    n_local = N // k

    def device_step(w, x_a, x_b, cov):
        def objective(w):
            return case.run(x_a @ w, x_b @ w, cov, "data")[0]
        value, grad = jax.value_and_grad(objective)(w)
        return value, jax.lax.pmean(grad, "data")

    replicate = lambda a: jnp.broadcast_to(a, (k,) + a.shape)  # noqa: E731
    values, w_grads = jax.pmap(device_step, axis_name="data", devices=jax.devices()[:k])(
        replicate(w), x_a.reshape(k, n_local, -1), x_b.reshape(k, n_local, -1), replicate(cov))
    for device in range(k):
        assert_close(values[device], loss, RTOL, "loss")
        assert_close(w_grads[device], w_grad, RTOL, "W gradient")
