"""A small convolutional encoder for tiny images (8x8 digits, 28x28 Fashion-MNIST).

Layer i is ``conv 3x3 (stride s_i, symmetric padding 1) - BatchNorm - ReLU``
with strides ``(stem_stride, 2, ..., 2, 1)``: the first layer uses
``stem_stride``, the last layer keeps the resolution, the layers between
halve it. With the default widths (32, 64, 128, 128):

* digits 8x8, ``stem_stride=1``: 8 -> 8 -> 4 -> 2 -> 2, then global average pool;
* Fashion-MNIST 28x28, ``stem_stride=2``: 28 -> 14 -> 7 -> 4 -> 4 (stride 1
  at 28x28 costs ~10x more on CPU for no accuracy gain in short runs).

Shapes: input float ``[B, H, W, C]``; output float32 ``[B, widths[-1]]``.
Parameter names: ``conv_{i}/kernel``, ``bn_{i}/{scale,bias}`` (+ batch_stats
``bn_{i}/{mean,var}``). This is not a published architecture; it exists so
that CPU-sized runs learn something in a minute.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from clrjax.models.encoders import Encoder, as_sizes

DEFAULT_WIDTHS = (32, 64, 128, 128)


def cnn_strides(num_layers: int, stem_stride: int) -> Tuple[int, ...]:
    """Per-layer strides: (stem_stride, 2, ..., 2, 1) (a single layer: (stem_stride,))."""
    if num_layers == 1:
        return (stem_stride,)
    return (stem_stride,) + (2,) * (num_layers - 2) + (1,)


def cnn_total_stride(num_layers: int, stem_stride: int) -> int:
    """Downsampling factor from the input to the last feature map."""
    total = 1
    for s in cnn_strides(num_layers, stem_stride):
        total *= s
    return total


class SmallCNN(nn.Module):
    """conv3x3-BN-ReLU x len(widths), global average pool. See the module docstring."""

    widths: Sequence[int] = DEFAULT_WIDTHS
    stem_stride: int = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        """x: float [B, H, W, C] -> float32 features [B, widths[-1]]."""
        x = jnp.asarray(x, self.dtype)
        for i, (width, stride) in enumerate(zip(self.widths, cnn_strides(len(self.widths), self.stem_stride))):
            x = nn.Conv(width, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                        use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                        name=f"conv_{i}")(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=jnp.float32, name=f"bn_{i}")(x)
            x = nn.relu(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def _check_input(cfg, image_size) -> None:
    sizes = as_sizes(image_size)
    minimum = cnn_total_stride(len(cfg["widths"]), cfg["stem_stride"])
    if min(sizes) < minimum:
        hint = " or use stem_stride=1" if cfg["stem_stride"] == 2 else ""
        raise ValueError(f"'{cfg['name']}' downsamples by {minimum}, so images of size {image_size!r} are too "
                         f"small; use images of at least {minimum}x{minimum}{hint}.")


ENCODER = Encoder(
    name="cnn_small",
    build=lambda cfg, dtype: SmallCNN(widths=tuple(cfg["widths"]), stem_stride=cfg["stem_stride"], dtype=dtype),
    defaults={"widths": DEFAULT_WIDTHS, "stem_stride": 1},
    num_features=lambda cfg: cfg["widths"][-1],
    check_input=_check_input,
    doc="conv-BN-ReLU stack for tiny images (CPU-sized runs)")
