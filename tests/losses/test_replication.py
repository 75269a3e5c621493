"""Every output of every method is *provably* replicated under shard_map.

The trainer declares the loss, the new method state and the metrics with
``out_specs=P()`` and the default ``check_vma=True``; that only compiles if
JAX can infer each output is identical on every shard. (Other tests compare
per-shard values numerically; this one pins the static property.)
"""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clrjax import losses


@pytest.mark.parametrize("name", losses.METHOD_NAMES)
@pytest.mark.parametrize("impl", ["replicated", "column_split"])
def test_outputs_replicated_with_out_specs_p(name, impl):
    method = losses.get_method(name)
    kwargs = {} if name == "simclr" else {"impl": impl}
    if name == "simclr" and impl == "column_split":
        kwargs = {"chunk_size": 8}
    rng = np.random.default_rng(0)
    z_a = rng.standard_normal((32, 16)).astype(np.float32)
    z_b = rng.standard_normal((32, 16)).astype(np.float32)
    state = method.init_state(16)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = jax.shard_map(lambda a, b, s: method.apply(a, b, s, axis_name="data", **kwargs), mesh=mesh,
                            in_specs=(P("data"), P("data"), P()), out_specs=(P(), P(), P()))
    loss, new_state, metrics = sharded(z_a, z_b, state)
    ref_loss, ref_state, ref_metrics = method.apply(z_a, z_b, state, **kwargs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), new_state, ref_state)
    assert set(metrics) == set(ref_metrics)
