"""Hard numerical regimes: low temperature with bf16 inputs, constant dimensions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.losses import barlow_twins_loss, simclr_loss, vicreg_loss
from tests.losses import reference
from tests.losses.cases import VICREG, assert_close, embeddings

N, D = 16, 8


def _all_finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("decoupled, chunk_size", [(False, None), (True, 6)])
def test_simclr_bf16_low_temperature(decoupled, chunk_size):
    z_a, z_b = (jnp.asarray(z, jnp.bfloat16) for z in embeddings(N, D, seed=2))
    fn = jax.value_and_grad(
        lambda a, b: simclr_loss(a, b, temperature=0.05, decoupled=decoupled,
                                 chunk_size=chunk_size, monitors=False)[0], argnums=(0, 1))
    loss, grads = fn(z_a, z_b)
    assert _all_finite((loss, grads)) and grads[0].dtype == jnp.bfloat16
    # The math runs in float32 on the bf16-rounded inputs: compare to float64 on those.
    ref = reference.simclr(np.asarray(z_a, np.float64), np.asarray(z_b, np.float64), 0.05,
                           decoupled)
    assert_close(loss, ref, 1e-5, "loss")


def _with_constant_dim(seed):
    z_a, z_b = embeddings(N, D, seed=seed)
    z_a[:, 0] = 3.0
    z_b[:, 0] = -1.0
    return z_a, z_b


def test_barlow_twins_constant_dimension_is_finite_and_exact():
    z_a, z_b = _with_constant_dim(8)
    fn = jax.value_and_grad(lambda a, b: barlow_twins_loss(a, b)[0], argnums=(0, 1))
    loss, grads = fn(jnp.float32(z_a), jnp.float32(z_b))
    assert _all_finite((loss, grads))
    assert_close(loss, reference.barlow_twins(z_a, z_b, 0.0051, 1e-5)[0], 1e-5)


def test_vicreg_constant_dimension_is_finite_and_exact():
    z_a, z_b = _with_constant_dim(9)
    fn = jax.value_and_grad(lambda a, b: vicreg_loss(a, b, **VICREG)[0], argnums=(0, 1))
    loss, grads = fn(jnp.float32(z_a), jnp.float32(z_b))
    assert _all_finite((loss, grads))
    assert_close(loss, reference.vicreg(z_a, z_b, **VICREG)[0], 1e-5)
