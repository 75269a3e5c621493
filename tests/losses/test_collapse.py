"""The collapse monitors' singular values: tall-skinny QR against a float64 SVD, on 1 and 8 devices.

RankMe needs the singular values of the global [N, d] batch. They are taken
from stacked per-shard R factors (clrjax/losses/collapse.py), which must
agree with NumPy's float64 SVD of the whole matrix for tall, square and wide
shards, with near-collapsed (rank-deficient) inputs, and must never
allocate an [N, N] buffer (as LAPACK's gesdd does).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clrjax.losses import collapse

# float32 QR + SVD: singular values to a few ulps of sigma_max.
SIGMA_ATOL = 1e-5
RANKME_RTOL = 1e-4


def _matrix(n, d, rank=None, seed=0):
    rng = np.random.default_rng(seed)
    if rank is None:
        return rng.normal(size=(n, d)).astype(np.float32)
    return (rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))).astype(np.float32)


def _sharded(fn, z, k):
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))
    return jax.jit(jax.shard_map(functools.partial(fn, axis_name="data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(z)


@pytest.mark.parametrize("n,d,rank", [(256, 16, None), (64, 8, None), (32, 48, None), (256, 16, 2)])
@pytest.mark.parametrize("k", [1, 8])
def test_singular_values_equal_float64_svd(n, d, rank, k):
    z = _matrix(n, d, rank)
    expected = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    got = np.asarray(_sharded(collapse.global_singular_values, z, k))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=SIGMA_ATOL * expected[0], rtol=0)
    p = expected / expected.sum() + collapse.RANKME_EPS
    rankme = np.exp(-np.sum(p * np.log(p)))
    assert float(_sharded(collapse.rankme, z, k)) == pytest.approx(rankme, rel=RANKME_RTOL)


def test_no_square_buffer_of_the_batch():
    n, d = 16384, 16
    compiled = jax.jit(collapse.rankme).lower(jax.ShapeDtypeStruct((n, d), jnp.float32)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < n * n * 4 / 16, f"{temp / 2**20:.0f} MiB of temporaries: an [N, N] buffer is back"
