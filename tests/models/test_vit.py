"""ViT: parameter counts against timm, shapes, remat equivalence, an attention reference.

The end-to-end match against a PyTorch timm-structured ViT (and the exported
names) lives in tests/test_export.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.models import build_encoder, num_features
from clrjax.models.vit import Attention, ViT

TINY = dict(dim=24, depth=2, num_heads=3)  # small enough to run forward/backward in tests


def _param_count(module, image_size):
    variables = jax.eval_shape(
        lambda: module.init(jax.random.key(0), jnp.zeros((1, image_size, image_size, 3))))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_vit_base_param_count_matches_timm():
    # sum(p.numel() for p in timm.create_model('vit_base_patch16_224').parameters()) == 86,567,656
    assert _param_count(ViT(dim=768, depth=12, num_heads=12, num_classes=1000), 224) == 86_567_656


def test_vit_large_param_count_matches_timm():
    # timm vit_large_patch16_224 (1000-class head): 304,326,632 = patch embedding 787,456 + cls 1,024
    # + positions 197 x 1,024 + 24 blocks x 12,596,224 + final norm 2,048 + head 1,025,000.
    assert _param_count(ViT(dim=1024, depth=24, num_heads=16, num_classes=1000), 224) == 304_326_632
    model = build_encoder({"name": "vit_large"})
    assert (model.dim, model.depth, model.num_heads) == (1024, 24, 16) and num_features({"name": "vit_large"}) == 1024


@pytest.mark.parametrize("name,expected", [("vit_tiny", 5_717_416), ("vit_small", 22_050_664)])
def test_vit_tiny_small_param_counts_match_timm(name, expected):
    # timm vit_tiny_patch16_224: 5,717,416; vit_small_patch16_224: 22,050,664 (with 1000-class head).
    cfg_dim = {"vit_tiny": (192, 3), "vit_small": (384, 6)}[name]
    model = ViT(dim=cfg_dim[0], depth=12, num_heads=cfg_dim[1], num_classes=1000)
    assert _param_count(model, 224) == expected


@pytest.mark.parametrize("name,dim", [("vit_tiny", 192), ("vit_small", 384), ("vit_base", 768)])
@pytest.mark.parametrize("size", [32, 48])
def test_registered_vit_shapes_any_multiple_of_16(name, dim, size):
    cfg = {"name": name}
    model = build_encoder(cfg)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), jnp.zeros((2, size, size, 3)), train=False))
    assert out.shape == (2, dim) and out.dtype == jnp.float32
    assert num_features(cfg) == dim
    assert variables["params"]["pos_embed"].shape == (1, 1 + (size // 16) ** 2, dim)


def test_attention_matches_reference():
    # Reference: softmax(q k^T / sqrt(d)) v per head, written with explicit loops over heads,
    # with q, k, v split from the fused projection in timm's (3, heads, head_dim) order.
    attn = Attention(dim=12, num_heads=3)
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    params = jax.jit(attn.init)(jax.random.key(1), x)["params"]
    qkv = np.asarray(x) @ np.asarray(params["qkv"]["kernel"]) + np.asarray(params["qkv"]["bias"])
    q, k, v = np.split(qkv, 3, axis=-1)
    heads = []
    for h in range(3):
        sl = slice(4 * h, 4 * (h + 1))
        logits = q[..., sl] @ np.swapaxes(k[..., sl], 1, 2) / 2.0
        w = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v[..., sl])
    expected = np.concatenate(heads, -1) @ np.asarray(params["proj"]["kernel"]) + np.asarray(params["proj"]["bias"])
    np.testing.assert_allclose(jax.jit(attn.apply)({"params": params}, x), expected, rtol=1e-5, atol=1e-6)


def test_remat_same_outputs_and_grads():
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    plain, remat = ViT(**TINY), ViT(**TINY, remat=True)
    variables = jax.jit(plain.init)(jax.random.key(1), x)
    # Same parameter tree: checkpoints are interchangeable between the two.
    assert jax.tree.structure(variables) == jax.tree.structure(
        jax.eval_shape(remat.init, jax.random.key(1), x))

    def loss(model):
        return jax.jit(jax.value_and_grad(lambda v: jnp.sum(model.apply(v, x) ** 2)))

    (l0, g0), (l1, g1) = loss(plain)(variables), loss(remat)(variables)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    # Near-zero gradient entries are sums that cancel; their round-off is relative to the gradient's
    # scale, not to the entry (at XLA's optimisation level 0, tests/xla_env.py, it shows).
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale), g0, g1)


def test_other_image_size_after_init_interpolates_position_embeddings():
    # Multi-crop: the embeddings learnt for the 2 x 2 init grid are resized to the input's grid
    # (tests/test_multicrop.py checks the interpolation); a size the patch does not divide fails.
    model = ViT(**TINY)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    assert variables["params"]["pos_embed"].shape == (1, 5, 24)
    assert jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 64, 3))).shape == (1, 24)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 32, 40, 3)))
