"""cnn_small, Projector, LinearProbe and SSLModel."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.models import build_encoder, build_ssl_model, num_features
from clrjax.models.heads import Projector


@pytest.mark.parametrize("size,channels,stem_stride,spatial", [(8, 1, 1, 2), (28, 1, 2, 4), (32, 3, 1, 8)])
def test_cnn_small_shapes(size, channels, stem_stride, spatial):
    cfg = {"name": "cnn_small", "stem_stride": stem_stride}
    model = build_encoder(cfg)
    x = jnp.zeros((3, size, size, channels))
    out, variables = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), x, train=False))
    assert out.shape == (3, 128) and out.dtype == jnp.float32 and num_features(cfg) == 128
    # The last conv runs at the documented resolution: (stem, 2, 2, 1) strides.
    _, inter = jax.eval_shape(lambda v: model.apply(v, x, train=False, capture_intermediates=True), variables)
    assert inter["intermediates"]["conv_3"]["__call__"][0].shape == (3, spatial, spatial, 128)


def test_cnn_small_forward_train_updates_batch_stats():
    model = build_encoder({"name": "cnn_small", "widths": [8, 8]})
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 1))
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
    h, state = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert h.shape == (4, 8)
    assert not np.allclose(state["batch_stats"]["bn_0"]["mean"], 0.0)


def test_projector_layout_and_last_bn_normalises():
    proj = Projector(hidden_dims=(16, 16), out_dim=8, use_bn=True, last_bn=True)
    h = jax.random.normal(jax.random.key(0), (32, 10)) * 3.0 + 2.0
    variables = jax.jit(lambda h: proj.init(jax.random.key(1), h, train=False))(h)
    params = variables["params"]
    assert sorted(params) == ["bn_0", "bn_1", "dense_0", "dense_1", "dense_out"]
    assert "bias" not in params["dense_0"] and "bias" not in params["dense_out"]  # BN follows
    assert "bn_out" in variables["batch_stats"]  # affine-free last BN: statistics only
    z, _ = jax.jit(lambda v, h: proj.apply(v, h, train=True, mutable=["batch_stats"]))(variables, h)
    assert z.shape == (32, 8) and z.dtype == jnp.float32
    # Affine-free BN in train mode: every output column has mean 0 and variance 1 (up to eps).
    np.testing.assert_allclose(np.mean(z, 0), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.var(z, 0), 1.0, rtol=1e-3)


def test_projector_without_bn_is_plain_mlp():
    proj = Projector(hidden_dims=(6,), out_dim=3, use_bn=False)
    h = jax.random.normal(jax.random.key(0), (4, 5))
    variables = jax.jit(lambda h: proj.init(jax.random.key(1), h, train=False))(h)
    p = variables["params"]
    assert "batch_stats" not in variables
    expected = np.maximum(h @ p["dense_0"]["kernel"] + p["dense_0"]["bias"], 0) @ p["dense_out"]["kernel"] + p["dense_out"]["bias"]
    np.testing.assert_allclose(jax.jit(lambda v, h: proj.apply(v, h, train=True))(variables, h), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ssl_setup():
    model = build_ssl_model({"name": "cnn_small", "widths": [8, 16]},
                            {"hidden_dims": [32], "out_dim": 4, "use_bn": True, "last_bn": False}, num_classes=5)
    x = jax.random.normal(jax.random.key(0), (6, 8, 8, 1))
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x, train=False))(x)
    return model, variables, x


def test_ssl_model_tree_names_and_outputs(ssl_setup):
    model, variables, x = ssl_setup
    assert sorted(variables["params"]) == ["encoder", "probe", "projector"]
    assert sorted(variables["batch_stats"]) == ["encoder", "projector"]
    out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert out["features"].shape == (6, 16) and out["embeddings"].shape == (6, 4)
    assert out["probe_logits"].shape == (6, 5)
    assert all(v.dtype == jnp.float32 for v in out.values())
    # encode == the features of __call__ in eval mode.
    encode, call = jax.jit(lambda v, x: (model.apply(v, x, method=model.encode),
                                         model.apply(v, x, train=False)["features"]))(variables, x)
    np.testing.assert_allclose(encode, call, rtol=1e-6)


def test_probe_loss_does_not_reach_encoder(ssl_setup):
    model, variables, x = ssl_setup

    def probe_loss(params):
        out = model.apply({**variables, "params": params}, x, train=False)
        return jnp.sum(out["probe_logits"] ** 2)

    grads = jax.jit(jax.grad(probe_loss))(variables["params"])
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["encoder"]))
    assert all(np.all(g == 0) for g in jax.tree.leaves(grads["projector"]))
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["probe"]))


def test_embedding_loss_reaches_encoder(ssl_setup):
    model, variables, x = ssl_setup
    grads = jax.jit(jax.grad(
        lambda p: jnp.sum(model.apply({**variables, "params": p}, x, train=False)["embeddings"] ** 2)))(
        variables["params"])
    assert any(np.any(g != 0) for g in jax.tree.leaves(grads["encoder"]))
