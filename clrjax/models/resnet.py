"""ResNet-18/34/50 encoders in the torchvision "v1.5" layout.

Source: He et al., "Deep Residual Learning for Image Recognition" (2016), as
implemented by ``torchvision.models.resnet`` (v1.5: in the bottleneck the
stride-2 sits on the 3x3 convolution, not on the first 1x1). Convolutions pad
symmetrically exactly like torchvision (explicit ``((p, p), (p, p))``; flax's
'SAME' would pad (0, 1) for stride 2 and shift every feature map by a pixel).

Parameter names mirror torchvision's module names so that
:mod:`clrjax.export` maps them one to one::

    conv1, bn1                         stem (7x7/2 + maxpool, or CIFAR 3x3/1)
    layer{s}_{b}/conv{k}, bn{k}        block b of stage s (k = 1..2 basic, 1..3 bottleneck)
    layer{s}_{b}/downsample_conv, downsample_bn    projection shortcut
    fc                                 optional classification head

Shapes: input ``x`` float ``[B, H, W, C]`` (NHWC); output features float32
``[B, F]`` with ``F = 512 * width_multiplier * expansion`` (512 for
ResNet-18/34, 2048 for ResNet-50), or logits ``[B, num_classes]`` when
``num_classes`` is set.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp

from clrjax.models.encoders import Encoder, as_sizes, check_positive_ints

# Stage depths and block type (basic: expansion 1, bottleneck: expansion 4).
RESNET_SPECS = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
}
EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision initialises convolutions with kaiming_normal_(mode='fan_out',
# nonlinearity='relu'): an untruncated normal with variance 2 / fan_out.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# torch.nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def stage_widths(width_multiplier: float) -> Tuple[int, Tuple[int, int, int, int]]:
    """Returns (stem width, the four stage widths) for a width multiplier.

    torchvision's ResNet is width 64 / (64, 128, 256, 512); SimCLR's ResNet-50
    (2x), (4x) multiply every width, stem included.
    """
    def scale(base: int) -> int:
        return max(1, int(round(base * width_multiplier)))

    return scale(64), (scale(64), scale(128), scale(256), scale(512))


def resnet_num_features(depth: int, width_multiplier: float = 1.0) -> int:
    """Feature dimension F of a ResNet encoder, computed without running it."""
    _, block = RESNET_SPECS[depth]
    return stage_widths(width_multiplier)[1][-1] * EXPANSION[block]


def resnet_total_stride(cifar_stem: bool) -> int:
    """Downsampling factor from the input to the last feature map."""
    stem = 1 if cifar_stem else 4  # conv 7x7/2 then maxpool 3x3/2
    return stem * 8  # stages 2, 3, 4 each halve the resolution


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    pad = (kernel - 1) // 2  # torchvision: padding = kernel // 2, symmetric
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride),
        padding=((pad, pad), (pad, pad)), use_bias=False,
        kernel_init=conv_init, dtype=dtype, param_dtype=jnp.float32, name=name)


NORMS = ("batch", "group")


def _norm(norm: str, groups: int, train: bool, dtype: Any, name: str, zero_init: bool = False) -> nn.Module:
    """BatchNorm (torchvision's default) or GroupNorm with ``groups`` groups, named like torchvision's ``bn*``.

    GroupNorm (Wu & He 2018) normalises each example on its own, so the
    network has no cross-example statistics: gradient caching
    (``config.micro_batch_size``) is then exact, and a batch of one behaves
    as in a large batch. Its parameters are 'scale' and 'bias', as BatchNorm's.
    """
    scale_init = nn.initializers.zeros if zero_init else nn.initializers.ones
    if norm == "group":
        return nn.GroupNorm(num_groups=groups, epsilon=1e-5, scale_init=scale_init,
                            dtype=dtype, param_dtype=jnp.float32, name=name)
    # Flax momentum 0.9 is torch momentum 0.1 (flax weights the old average).
    return nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=scale_init,
        dtype=dtype, param_dtype=jnp.float32, name=name)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3(stride) - BN - ReLU - 3x3 - BN, + shortcut, ReLU."""

    width: int
    stride: int = 1
    zero_init_residual: bool = False
    dtype: Any = jnp.float32
    norm: str = "batch"
    norm_groups: int = 32

    def _bn(self, train: bool, name: str, zero_init: bool = False) -> nn.Module:
        return _norm(self.norm, self.norm_groups, train, self.dtype, name, zero_init)

    @nn.compact
    def __call__(self, x, train: bool):
        residual = self._shortcut(x, self.width, train)
        y = _conv(self.width, 3, self.stride, self.dtype, "conv1")(x)
        y = nn.relu(self._bn(train, "bn1")(y))
        y = _conv(self.width, 3, 1, self.dtype, "conv2")(y)
        y = self._bn(train, "bn2", self.zero_init_residual)(y)
        return nn.relu(y + residual)

    def _shortcut(self, x, out_features: int, train: bool):
        if self.stride == 1 and x.shape[-1] == out_features:
            return x
        x = _conv(out_features, 1, self.stride, self.dtype, "downsample_conv")(x)
        return self._bn(train, "downsample_bn")(x)


class Bottleneck(BasicBlock):
    """torchvision Bottleneck (v1.5): 1x1 - BN - ReLU - 3x3(stride) - BN - ReLU - 1x1(4w) - BN, + shortcut, ReLU."""

    @nn.compact
    def __call__(self, x, train: bool):
        out_features = self.width * EXPANSION["bottleneck"]
        residual = self._shortcut(x, out_features, train)
        y = _conv(self.width, 1, 1, self.dtype, "conv1")(x)
        y = nn.relu(self._bn(train, "bn1")(y))
        y = _conv(self.width, 3, self.stride, self.dtype, "conv2")(y)
        y = nn.relu(self._bn(train, "bn2")(y))
        y = _conv(out_features, 1, 1, self.dtype, "conv3")(y)
        y = self._bn(train, "bn3", self.zero_init_residual)(y)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet encoder (torchvision v1.5 layout), see the module docstring.

    Attributes:
      depth: 18, 34 or 50.
      cifar_stem: 3x3 stride-1 stem conv and no maxpool (for 32x32 inputs, as
        in SimCLR's CIFAR experiments) instead of 7x7 stride-2 + maxpool.
      width_multiplier: scales every width (SimCLR's ResNet-50 (2x)/(4x)).
      zero_init_residual: initialise the last BN gamma of every block to 0
        (Goyal et al. 2017; torchvision's ``zero_init_residual``).
      num_classes: if set, a final Linear 'fc' and the output is logits.
      dtype: compute dtype; parameters are always float32.
      norm: 'batch' (torchvision) or 'group' (GroupNorm, no cross-example
        statistics; torchvision's ``norm_layer=lambda c: nn.GroupNorm(g, c)``).
      norm_groups: GroupNorm groups (32 in Wu & He 2018); must divide every width.
    """

    depth: int = 50
    cifar_stem: bool = False
    width_multiplier: float = 1.0
    zero_init_residual: bool = False
    num_classes: Optional[int] = None
    dtype: Any = jnp.float32
    norm: str = "batch"
    norm_groups: int = 32

    @nn.compact
    def __call__(self, x, train: bool):
        """x: float [B, H, W, C] -> float32 features [B, F] (or logits [B, num_classes])."""
        stage_depths, block_type = RESNET_SPECS[self.depth]
        block_cls = BasicBlock if block_type == "basic" else Bottleneck
        stem_width, widths = stage_widths(self.width_multiplier)

        x = jnp.asarray(x, self.dtype)
        if self.cifar_stem:
            x = _conv(stem_width, 3, 1, self.dtype, "conv1")(x)
            x = nn.relu(_norm(self.norm, self.norm_groups, train, self.dtype, "bn1")(x))
        else:
            x = _conv(stem_width, 7, 2, self.dtype, "conv1")(x)
            x = nn.relu(_norm(self.norm, self.norm_groups, train, self.dtype, "bn1")(x))
            # torch's MaxPool2d(3, 2, padding=1) pads with -inf, as flax does.
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for stage, (num_blocks, width) in enumerate(zip(stage_depths, widths)):
            for b in range(num_blocks):
                stride = 2 if (stage > 0 and b == 0) else 1
                x = block_cls(width, stride, self.zero_init_residual, self.dtype, self.norm,
                              self.norm_groups, name=f"layer{stage + 1}_{b}")(x, train)

        features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if self.num_classes is None:
            return features
        return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=jnp.float32,
                        param_dtype=jnp.float32, name="fc")(features)



def _check_input(depth: int, cfg, image_size) -> None:
    _check_groups(depth, cfg)
    sizes = as_sizes(image_size)
    minimum = resnet_total_stride(cfg["cifar_stem"])
    if min(sizes) < minimum:
        hint = "" if cfg["cifar_stem"] else " or set cifar_stem=True for small images"
        raise ValueError(f"'{cfg['name']}' downsamples by {minimum}, so images of size {image_size!r} are too "
                         f"small; use images of at least {minimum}x{minimum}{hint}.")


def _check_groups(depth: int, cfg) -> None:
    """GroupNorm's group count must divide the channels of every normalised layer."""
    if cfg["norm"] != "group":
        return
    stem, widths = stage_widths(cfg["width_multiplier"])
    expansion = EXPANSION[RESNET_SPECS[depth][1]]
    channels = sorted({stem, *widths, *(w * expansion for w in widths)})
    bad = [c for c in channels if c % cfg["norm_groups"]]
    if bad:
        raise ValueError(f"norm_groups={cfg['norm_groups']} does not divide the ResNet's channel counts {bad} "
                         f"(width_multiplier={cfg['width_multiplier']}); choose norm_groups dividing "
                         f"{channels[0]}, e.g. {math.gcd(*channels)}.")


def _check_norm(field: str, value: Any) -> str:
    if value not in NORMS:
        raise ValueError(f"model config field '{field}' must be one of {', '.join(NORMS)}, got {value!r}.")
    return value


def _resnet_entry(depth: int) -> Encoder:
    return Encoder(
        name=f"resnet{depth}",
        build=lambda cfg, dtype: ResNet(depth=depth, cifar_stem=cfg["cifar_stem"],
                                        width_multiplier=cfg["width_multiplier"],
                                        zero_init_residual=cfg["zero_init_residual"], dtype=dtype,
                                        norm=cfg["norm"], norm_groups=cfg["norm_groups"]),
        defaults={"cifar_stem": False, "width_multiplier": 1.0, "zero_init_residual": False,
                  "norm": "batch", "norm_groups": 32},
        checks={"norm": _check_norm, "norm_groups": lambda field, value: check_positive_ints(field, (value,))[0]},
        num_features=lambda cfg: resnet_num_features(depth, cfg["width_multiplier"]),
        check_input=lambda cfg, image_size: _check_input(depth, cfg, image_size),
        doc=f"ResNet-{depth} (torchvision v1.5 layout)")


RESNET18, RESNET34, RESNET50 = (_resnet_entry(depth) for depth in (18, 34, 50))
