"""Registry: names, config validation, num_features, input-size checks, bf16 compute."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clrjax.models import (build_encoder, encoder_names, build_ssl_model, check_input_size,
                           num_features, resolve_model_config)

@pytest.mark.parametrize("name", encoder_names())
def test_num_features_matches_built_encoder(name):
    cfg = {"name": name}
    size = 8 if name == "cnn_small" else 32
    out = jax.eval_shape(lambda: build_encoder(cfg).init_with_output(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)[0])
    assert out.shape == (1, num_features(cfg))


def test_resolve_fills_defaults_and_accepts_config_dict():
    cfg = resolve_model_config(ml_collections.ConfigDict({"name": "resnet50", "zero_init_residual": True}))
    assert cfg == {"name": "resnet50", "dtype": "float32", "cifar_stem": False,
                   "width_multiplier": 1.0, "zero_init_residual": True, "norm": "batch", "norm_groups": 32}
    assert resolve_model_config({"name": "cnn_small", "widths": (8, 8)})["widths"] == [8, 8]


@pytest.mark.parametrize("cfg,match", [
    ({"name": "resnet101"}, r"'name'.*resnet18, resnet34"),
    ({}, r"'name'"),
    ({"name": "resnet18", "remat": True}, r"'remat' is not an option of 'resnet18'.*cifar_stem"),
    ({"name": "vit_base", "cifar_stem": True}, r"'cifar_stem'.*remat"),
    ({"name": "resnet18", "dtype": "float16"}, r"'dtype'.*float32, bfloat16"),
    ({"name": "resnet18", "width_multiplier": 0}, r"'width_multiplier' must be a positive"),
    ({"name": "resnet18", "cifar_stem": "yes"}, r"'cifar_stem' must be True or False"),
    ({"name": "cnn_small", "stem_stride": 3}, r"'stem_stride' must be 1 or 2"),
    ({"name": "cnn_small", "widths": []}, r"'widths'"),
    ({"name": "cnn_small", "widths": [8, -1]}, r"'widths' must be a list of positive integers"),
])
def test_invalid_configs_raise_one_clear_sentence(cfg, match):
    with pytest.raises(ValueError, match=match):
        build_encoder(cfg)


def test_invalid_projector_and_num_classes():
    enc = {"name": "cnn_small"}
    bn = {"use_bn": True, "last_bn": False}
    with pytest.raises(ValueError, match=r"projector config field 'hidden' is unknown.*hidden_dims"):
        build_ssl_model(enc, {"hidden": [8], "out_dim": 4, **bn}, 10)
    with pytest.raises(ValueError, match=r"'out_dim' must be a positive integer"):
        build_ssl_model(enc, {"hidden_dims": [8], "out_dim": 0, **bn}, 10)
    with pytest.raises(ValueError, match=r"num_classes"):
        build_ssl_model(enc, {"hidden_dims": [8], "out_dim": 4, **bn}, 0)
    # No library default: a missing field is named (the config holds the defaults).
    with pytest.raises(ValueError, match=r"projector config field 'use_bn' is missing"):
        build_ssl_model(enc, {"hidden_dims": [8], "out_dim": 4}, 10)


@pytest.mark.parametrize("cfg,size", [
    ({"name": "vit_small"}, 32), ({"name": "vit_small"}, (224, 160)),
    ({"name": "resnet50"}, 32), ({"name": "resnet18", "cifar_stem": True}, 8),
    ({"name": "cnn_small"}, 8), ({"name": "cnn_small", "stem_stride": 2}, 28)])
def test_check_input_size_accepts(cfg, size):
    check_input_size(cfg, size)


@pytest.mark.parametrize("cfg,size,match", [
    ({"name": "vit_small"}, 28, r"divisible by its patch size 16"),
    ({"name": "vit_base"}, (224, 100), r"divisible"),
    ({"name": "resnet50"}, 16, r"at least 32x32 or set cifar_stem=True"),
    ({"name": "resnet18", "cifar_stem": True}, 4, r"at least 8x8"),
    ({"name": "cnn_small", "stem_stride": 2}, 6, r"at least 8x8 or use stem_stride=1"),
    ({"name": "cnn_small"}, 0, r"image_size must be a positive"),
])
def test_check_input_size_rejects(cfg, size, match):
    with pytest.raises(ValueError, match=match):
        check_input_size(cfg, size)


def _matmul_input_dtypes(fn, *args):
    """dtypes of the operands of every conv / dot_general in fn's jaxpr (tracing only, no compile)."""
    found = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
                found.update(str(v.aval.dtype) for v in eqn.invars)
            for param in eqn.params.values():
                for sub in (param if isinstance(param, (tuple, list)) else [param]):
                    if hasattr(sub, "jaxpr"):  # ClosedJaxpr
                        walk(sub.jaxpr)
                    elif hasattr(sub, "eqns"):  # Jaxpr
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("cfg", [
    {"name": "cnn_small"}, {"name": "resnet18", "cifar_stem": True}, {"name": "resnet50"},
    {"name": "vit_tiny", "remat": True}])
def test_bfloat16_config_computes_in_bf16_with_float32_params(cfg):
    model = build_encoder({**cfg, "dtype": "bfloat16"})
    x = jnp.zeros((2, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert {str(v.dtype) for v in jax.tree.leaves(variables)} == {"float32"}
    apply = lambda v, x: model.apply(v, x, train=False)  # noqa: E731
    assert jax.eval_shape(apply, variables, x).dtype == jnp.float32
    assert _matmul_input_dtypes(apply, variables, x) == {"bfloat16"}


def test_bfloat16_features_close_to_float32():
    # Numerical check on the cheapest encoder (the dtype plumbing is checked for all above).
    cfg = {"name": "cnn_small", "widths": [8, 16]}
    f32, bf16 = build_encoder(cfg), build_encoder({**cfg, "dtype": "bfloat16"})
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    variables = jax.jit(lambda x: f32.init(jax.random.key(1), x, train=False))(x)
    run = jax.jit(lambda v, x: (f32.apply(v, x, train=False), bf16.apply(v, x, train=False)))
    h32, h16 = run(variables, x)
    assert h16.dtype == jnp.float32
    # bf16 keeps an 8-bit mantissa: a few tenths of a percent per op, a few percent at most overall;
    # a difference above float32 rounding shows that the compute really ran in bf16.
    rel = float(np.linalg.norm(h16 - h32) / np.linalg.norm(h32))
    assert 1e-4 < rel < 5e-2
