"""Vision Transformer (ViT) encoders, patch size 16, in the timm layout.

Source: Dosovitskiy et al., "An Image is Worth 16x16 Words" (ICLR 2021), as
implemented by timm's ``VisionTransformer`` (``vit_{tiny,small,base,large}_patch16_224``):
learnable cls token and position embeddings, pre-LayerNorm blocks (eps 1e-6),
fused qkv projection with bias, exact (erf) GELU MLP of ratio 4, final
LayerNorm; the features are the final-LN cls token.

Parameter names mirror timm's so that :mod:`clrjax.export` maps them one to one::

    patch_embed/kernel [16, 16, C, D], patch_embed/bias [D]
    cls_token [1, 1, D], pos_embed [1, 1 + N, D]
    blocks_{i}/norm1, attn/qkv [D, 3D], attn/proj, norm2, mlp/fc1, mlp/fc2
    norm                               final LayerNorm
    head                               optional classification head

Shapes: input float ``[B, H, W, C]`` with H and W divisible by 16. The
position embeddings are learnt for the square patch grid g0 x g0 of the image
size used at ``init`` (N = g0^2). An input of another size (multi-crop's local
crops, :mod:`clrjax.methods.multicrop`) gets them interpolated to its grid
(H/16) x (W/16) by :func:`interpolate_pos_embed`: the cls token's embedding
is kept, the patch embeddings are resized as a g0 x g0 image with D channels
by bicubic interpolation, as DINO's ``VisionTransformer.interpolate_pos_encoding``
(official code, github.com/facebookresearch/dino ``vision_transformer.py``:
``nn.functional.interpolate(..., mode='bicubic')`` with half-pixel sampling).
Differences from DINO's, which only matter away from the native size:
``jax.image.resize``'s cubic kernel is Keys' with a = -0.5 (PyTorch's
bicubic uses a = -0.75) and it renormalises the kernel at the border where
PyTorch replicates the edge; the grid is given as an output size, not a
scale factor (DINO adds 0.1 to the factor to land on the same size). At the
native size the embeddings are used unchanged. Output float32 ``[B, D]``
(logits ``[B, num_classes]`` when ``num_classes`` is set).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clrjax.models.encoders import Encoder, as_sizes

PATCH_SIZE = 16
# (hidden dim D, depth, heads); MLP dim is 4 D. timm vit_{tiny,small,base,large}_patch16_224;
# Base and Large are ViT-B and ViT-L of Dosovitskiy et al. (2021), Table 1.
VIT_SPECS = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

_dense_init = nn.initializers.xavier_uniform()  # timm's init for every Linear
_embed_init = nn.initializers.truncated_normal(stddev=0.02)  # timm: trunc_normal_(std=.02)
_LN_EPS = 1e-6  # timm: partial(nn.LayerNorm, eps=1e-6)


def _dense(features: int, dtype: Any, name: str) -> nn.Dense:
    return nn.Dense(features, kernel_init=_dense_init, dtype=dtype,
                    param_dtype=jnp.float32, name=name)


def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=_LN_EPS, dtype=dtype, param_dtype=jnp.float32, name=name)


def interpolate_pos_embed(pos_embed: jax.Array, grid: Tuple[int, int]) -> jax.Array:
    """[1, 1 + g0^2, D] position embeddings (cls first) -> [1, 1 + gh gw, D] for a (gh, gw) patch grid.

    The identity at the native grid (g0, g0); elsewhere the patch embeddings are resized
    bicubically as a g0 x g0 image (see the module docstring; DINO's ``interpolate_pos_encoding``).
    """
    n, dim = pos_embed.shape[1] - 1, pos_embed.shape[2]
    side = math.isqrt(n)
    if tuple(grid) == (side, side) and side * side == n:
        return pos_embed
    if side * side != n:
        raise ValueError(f"position embeddings of {n} patches are not a square grid; cannot interpolate "
                         f"them to {grid[0]}x{grid[1]}.")
    patches = pos_embed[0, 1:].astype(jnp.float32).reshape(side, side, dim)
    resized = jax.image.resize(patches, (grid[0], grid[1], dim), method="cubic", antialias=False)
    resized = resized.reshape(1, grid[0] * grid[1], dim).astype(pos_embed.dtype)
    return jnp.concatenate([pos_embed[:, :1], resized], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention with timm's fused qkv: [B, N, D] -> [B, N, D]."""

    dim: int
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = _dense(3 * self.dim, self.dtype, "qkv")(x)
        # timm: reshape(B, N, 3, heads, head_dim); the export relies on this order.
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, head_dim]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(head_dim).astype(q.dtype)
        # Softmax in float32: bf16 logits lose the small attention weights.
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, self.dim)
        return _dense(self.dim, self.dtype, "proj")(out)


class Mlp(nn.Module):
    """fc1 (D -> 4D) - GELU (exact, as torch.nn.GELU) - fc2 (4D -> D)."""

    dim: int
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _dense(self.hidden_dim, self.dtype, "fc1")(x)
        x = nn.gelu(x, approximate=False)
        return _dense(self.dim, self.dtype, "fc2")(x)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    dim: int
    num_heads: int
    mlp_ratio: int = 4
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.dim, self.num_heads, self.dtype, name="attn")(
            _layer_norm(self.dtype, "norm1")(x))
        return x + Mlp(self.dim, self.mlp_ratio * self.dim, self.dtype, name="mlp")(
            _layer_norm(self.dtype, "norm2")(x))


class ViT(nn.Module):
    """ViT encoder (timm layout), see the module docstring.

    Attributes:
      dim, depth, num_heads: D, number of blocks, attention heads.
      patch_size: 16 for the registered models.
      remat: wrap each block in ``nn.remat`` (recompute activations in the
        backward pass: less memory, ~30% more compute, same numbers).
      num_classes: if set, a final Linear 'head' on the cls feature.
      dtype: compute dtype; parameters are always float32.
    """

    dim: int = 768
    depth: int = 12
    num_heads: int = 12
    patch_size: int = PATCH_SIZE
    remat: bool = False
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        """x: float [B, H, W, C] -> float32 features [B, D]. ``train`` is unused (no dropout/BN)."""
        del train  # Same computation in both modes; kept for the common encoder signature.
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ValueError(f"ViT input {x.shape[1]}x{x.shape[2]} is not divisible by the patch size {p}.")
        grid = (x.shape[1] // p, x.shape[2] // p)
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID",
                    kernel_init=nn.initializers.lecun_normal(), dtype=self.dtype,
                    param_dtype=jnp.float32, name="patch_embed")(x)
        batch = x.shape[0]
        x = x.reshape(batch, -1, self.dim)  # row-major patches, as timm's flatten(2)

        cls = self.param("cls_token", _embed_init, (1, 1, self.dim), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.dim)).astype(x.dtype), x], axis=1)
        if self.has_variable("params", "pos_embed"):  # learnt for the init grid; x may have another
            pos = self.get_variable("params", "pos_embed")
        else:
            pos = self.param("pos_embed", _embed_init, (1, x.shape[1], self.dim), jnp.float32)
        x = x + interpolate_pos_embed(pos, grid).astype(x.dtype)

        block_cls = nn.remat(Block) if self.remat else Block
        for i in range(self.depth):
            x = block_cls(self.dim, self.num_heads, dtype=self.dtype, name=f"blocks_{i}")(x)
        x = _layer_norm(self.dtype, "norm")(x)
        features = x[:, 0].astype(jnp.float32)
        if self.num_classes is None:
            return features
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, dtype=jnp.float32,
                        param_dtype=jnp.float32, name="head")(features)


def _check_input(cfg, image_size) -> None:
    sizes = as_sizes(image_size)
    if any(s % PATCH_SIZE for s in sizes):
        raise ValueError(f"'{cfg['name']}' needs an image size divisible by its patch size {PATCH_SIZE}, "
                         f"got {image_size!r}; resize or crop to e.g. "
                         f"{max(PATCH_SIZE, PATCH_SIZE * round(min(sizes) / PATCH_SIZE))}.")


def _vit_entry(size: str) -> Encoder:
    dim, depth, heads = VIT_SPECS[size]
    return Encoder(
        name=f"vit_{size}",
        build=lambda cfg, dtype: ViT(dim=dim, depth=depth, num_heads=heads, remat=cfg["remat"], dtype=dtype),
        defaults={"remat": False},
        num_features=lambda cfg: dim,
        check_input=_check_input,
        doc=f"ViT-{size[0].upper()}/16 (timm layout)")


VIT_TINY, VIT_SMALL, VIT_BASE, VIT_LARGE = (_vit_entry(size) for size in ("tiny", "small", "base", "large"))
