"""ResNet: parameter counts against torchvision, layout details, init options.

The numerical match against an independent PyTorch implementation of the
torchvision structure lives in tests/test_export.py (it also checks the
exported weight names).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.models import build_encoder, num_features
from clrjax.models.resnet import BasicBlock, ResNet, _conv, _norm


def _param_count(module, image_size):
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


# Published counts: sum(p.numel() for p in torchvision.models.resnet{18,34,50}().parameters())
# (torchvision model docs: 11.7M / 21.8M / 25.6M; exact values below).
@pytest.mark.parametrize("depth,expected", [(18, 11_689_512), (34, 21_797_672), (50, 25_557_032)])
def test_param_count_matches_torchvision(depth, expected):
    assert _param_count(ResNet(depth=depth, num_classes=1000), 224) == expected


@pytest.mark.parametrize("name,cifar,size", [
    ("resnet18", False, 64), ("resnet34", True, 32), ("resnet50", False, 224)])
def test_feature_shape_and_num_features(name, cifar, size):
    cfg = {"name": name, "cifar_stem": cifar}
    encoder = build_encoder(cfg)
    out = jax.eval_shape(lambda: encoder.init_with_output(
        jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False)[0])
    expected_f = 2048 if name == "resnet50" else 512
    assert out.shape == (2, expected_f) and out.dtype == jnp.float32
    assert num_features(cfg) == expected_f


def test_width_multiplier_scales_features_and_params():
    # SimCLR's ResNet-50 (2x) has 4096-d features and ~94M parameters (SimCLR paper, Table 8:
    # 94M for ResNet-50 (2x) without the head).
    cfg = {"name": "resnet50", "width_multiplier": 2}
    assert num_features(cfg) == 4096
    n = _param_count(build_encoder(cfg), 64)
    assert 93e6 < n < 95e6


def test_stride2_conv_pads_symmetrically_like_torch():
    # torchvision's 7x7/2 conv with padding 3: output (0, 0) sees input rows/cols -3..3.
    # 'SAME' would pad (2, 3) and output (0, 0) would see rows -2..4.
    conv = _conv(4, 7, 2, jnp.float32, "c")
    x = jnp.zeros((1, 16, 16, 3))
    params = conv.init(jax.random.key(0), x)
    base = conv.apply(params, x)[0, 0, 0]
    inside = conv.apply(params, x.at[0, 3, 3].set(1.0))[0, 0, 0]
    outside = conv.apply(params, x.at[0, 4, 0].set(1.0))[0, 0, 0]
    assert not np.allclose(inside, base)
    np.testing.assert_array_equal(outside, base)
    assert conv.apply(params, x).shape == (1, 8, 8, 4)  # floor((16 + 6 - 7) / 2) + 1


def test_zero_init_residual_makes_blocks_identity():
    block = BasicBlock(width=8, zero_init_residual=True)
    x = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 5, 5, 8)))
    variables = jax.jit(lambda x: block.init(jax.random.key(0), x, train=False))(x)
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], 0.0)
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], 1.0)
    # The residual branch is zero, so the block is relu(x) = x for x >= 0.
    np.testing.assert_allclose(jax.jit(lambda v, x: block.apply(v, x, train=False))(variables, x), x, atol=1e-6)


def test_batchnorm_momentum_follows_torch_convention():
    # torch momentum 0.1: running = 0.9 running + 0.1 batch_stat (flax momentum 0.9).
    # Every ResNet BN is built by _norm. (eps 1e-5 is covered by the eval-mode
    # match against PyTorch in tests/test_export.py.)
    # Known difference: flax tracks the biased batch variance, torch the unbiased one.
    bn = _norm("batch", 32, train=True, dtype=jnp.float32, name="bn")
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) * 2.0 + 1.0
    variables = bn.init(jax.random.key(1), x)
    _, state = bn.apply(variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(state["batch_stats"]["mean"], 0.1 * np.mean(x, axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(state["batch_stats"]["var"], 0.9 + 0.1 * np.var(x, axis=(0, 1, 2)), rtol=1e-5)


def test_groupnorm_layer_matches_its_definition():
    """Wu & He 2018, eq. 1-3: per example, mean/variance over (H, W, channels of the group), eps 1e-5."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 4, 8)), np.float64) * 3.0 + 1.0
    gn = _norm("group", 4, train=True, dtype=jnp.float32, name="gn")
    variables = gn.init(jax.random.key(1), jnp.asarray(x, jnp.float32))
    got = gn.apply(variables, jnp.asarray(x, jnp.float32))
    g = x.reshape(3, 4, 4, 4, 2)  # [B, H, W, groups, channels per group]
    mean, var = g.mean(axis=(1, 2, 4), keepdims=True), g.var(axis=(1, 2, 4), keepdims=True)
    want = ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_groupnorm_resnet_has_no_cross_example_statistics():
    """model.norm='group': each example's features are the same alone as in a batch (BatchNorm's are not)."""
    x = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))
    outs = {}
    for norm in ("group", "batch"):
        net = ResNet(depth=18, cifar_stem=True, width_multiplier=0.125, norm=norm, norm_groups=8)
        variables = net.init(jax.random.key(1), x, train=False)
        def apply(v, a, net=net):  # eager: a jit per norm and shape costs more than these few ops
            return net.apply(v, a, train=True, mutable=["batch_stats"])[0]
        outs[norm] = (np.asarray(apply(variables, x)[:1]), np.asarray(apply(variables, x[:1])))
    np.testing.assert_allclose(*outs["group"], rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(outs["batch"][0] - outs["batch"][1])) > 1e-3
