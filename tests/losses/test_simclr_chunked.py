"""Streaming SimCLR over column blocks gives the dense values and gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.losses import simclr_loss
from tests.losses.cases import assert_close, embeddings

N, D = 8, 5  # 2N = 16 columns
RTOL = 1e-5  # float32, different summation order


def _value_and_grads(z_a, z_b, **kwargs):
    def loss(a, b):
        return simclr_loss(a, b, temperature=0.1, monitors=False, **kwargs)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(z_a, z_b)


@pytest.mark.parametrize("decoupled", [False, True])
def test_chunked_matches_dense(decoupled):
    z_a, z_b = (jnp.float32(z) for z in embeddings(N, D, seed=5))
    (loss, metrics), grads = _value_and_grads(z_a, z_b, decoupled=decoupled)
    # 1: blocks that are entirely masked (self or positive); 7: does not divide 2N = 16.
    for chunk in (1, 7):
        (c_loss, c_metrics), c_grads = _value_and_grads(z_a, z_b, decoupled=decoupled,
                                                        chunk_size=chunk)
        assert_close(c_loss, loss, RTOL, f"loss chunk={chunk}")
        for name in metrics:
            assert_close(c_metrics[name], metrics[name], RTOL, f"{name} chunk={chunk}")
        for g, cg in zip(grads, c_grads):
            assert_close(cg, g, RTOL, f"grad chunk={chunk}")


def _temp_bytes(chunk_size, n=1024, d=16):
    z = jax.ShapeDtypeStruct((n, d), jnp.float32)
    grad = jax.grad(lambda a, b: simclr_loss(a, b, chunk_size=chunk_size, monitors=False)[0],
                    argnums=(0, 1))
    return jax.jit(grad).lower(z, z).compile().memory_analysis().temp_size_in_bytes


def test_chunking_bounds_loss_and_grad_temporaries():
    """Dense needs [2n, 2N] f32 blocks (16 MiB at n=1024); chunk 128 needs 1/16 of that."""
    dense, chunked = _temp_bytes(None), _temp_bytes(128)
    assert dense >= 2 * 1024 * 2 * 1024 * 4
    assert chunked < dense / 4, (chunked, dense)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5])
def test_bad_chunk_size_raises(chunk_size):
    z = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        simclr_loss(z, z, chunk_size=chunk_size)
