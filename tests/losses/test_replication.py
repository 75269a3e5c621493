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

from clrjax import config as config_lib, methods


@pytest.mark.parametrize("name", methods.names())
@pytest.mark.parametrize("impl", ["replicated", "column_split"])
def test_outputs_replicated_with_out_specs_p(name, impl):
    method = methods.get(name)
    takes_impl = "impl" in method.loss_kwarg_defaults()
    takes_chunks = "chunk_size" in method.loss_kwarg_defaults()
    # A loss with its own layouts (config.LOSS_SPECS '<method>.impl') runs its two layouts in the two slots.
    own = config_lib.LOSS_SPECS.get(f"{name}.impl")
    layout = own.choices[("replicated", "column_split").index(impl)] if own is not None else impl
    kwargs = {"impl": layout} if takes_impl else {}
    if takes_chunks and impl == "column_split":
        kwargs = {"chunk_size": 8}
    if not (takes_impl or takes_chunks) and impl == "column_split":
        pytest.skip(f"{name} has one layout")
    rng = np.random.default_rng(0)
    config = config_lib.base_config()
    config.projector.out_dim = 16
    state = method.init_state(config, {})
    # [32, 2, 16] per loss input (the 'embeddings', or e.g. BYOL's 'predictions' and 'targets')
    outputs = {key: rng.standard_normal((32, 2, 16)).astype(np.float32) for key in method.loss_inputs}
    batch = {"label": rng.integers(0, 4, 32).astype(np.int32), "index": np.arange(32, dtype=np.int32)}
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    sharded = jax.shard_map(lambda o, b, s: method.loss(o, b, s, axis_name="data", **kwargs), mesh=mesh,
                            in_specs=(P("data"), P("data"), P()), out_specs=(P(), P(), P()))
    loss, new_state, metrics = sharded(outputs, batch, state)
    ref_loss, ref_state, ref_metrics = method.loss(outputs, batch, state, **kwargs)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), new_state, ref_state)
    assert set(metrics) == set(ref_metrics)
