"""On-device batched image augmentations in JAX (SimCLR appendix A, BYOL table 6).

One view of one example (:func:`augment_view`), in this order:

1. random resized crop to S x S (area fraction ~ U(crop_scale), log aspect
   ratio ~ U(log crop_ratio)), bilinear with antialiasing;
2. horizontal flip with probability flip_prob;
3. colour jitter with probability jitter_prob: brightness, contrast,
   saturation, hue, in this fixed order (see :func:`color_jitter`);
4. grayscale with probability gray_prob;
5. Gaussian blur with probability blur_prob[view], sigma ~ U(blur_sigma);
6. solarisation with probability solarize_prob[view];
7. per-channel normalisation (x - mean) / std.

Steps 1-6 work on float32 values in [0, 1] (uint8 / 255). For 1-channel
images saturation, hue and grayscale are identities, so colour jitter reduces
to brightness and contrast.

Randomness: the key of example i, view v is
``fold_in(fold_in(key, example_index[i]), v)``. It depends only on the global
example index (``clrjax.data.pipeline``), never on the position in the local
batch, so results are the same for any device count or batch sharding.

All functions are traceable; ``cfg`` is read at trace time (Python floats),
so close over it rather than passing it through ``jax.jit`` arguments.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp

# ITU-R BT.601 luma weights, as in tf.image.rgb_to_grayscale and torchvision.
LUMA = (0.299, 0.587, 0.114)
CROP_ATTEMPTS = 10  # candidate crops per image, as in torchvision's RandomResizedCrop


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The augmentation config as plain Python values (read once, at trace time)."""
    crop_size: int
    crop_scale: Tuple[float, float]
    crop_ratio: Tuple[float, float]
    flip_prob: float
    jitter_strength: float
    jitter_prob: float
    gray_prob: float
    blur_prob: Tuple[float, float]
    blur_sigma: Tuple[float, float]
    solarize_prob: Tuple[float, float]
    solarize_threshold: float
    mean: Tuple[float, ...]
    std: Tuple[float, ...]


def augment_params(cfg: Mapping[str, Any]) -> AugmentParams:
    """Reads ``cfg`` (dict or ConfigDict), which must hold every field of :class:`AugmentParams`.

    There are no fallbacks here: the values, with their sources, live in
    ``clrjax.config.base_config().augment``, the one place defaults are set.
    """
    _check_fields_present(cfg)

    def get(name):
        value = cfg[name]
        return tuple(float(v) for v in value) if isinstance(value, (tuple, list)) else value

    def per_view(name):
        value = get(name)
        return (float(value),) * 2 if not isinstance(value, tuple) else value

    return AugmentParams(
        crop_size=int(get("crop_size")), crop_scale=get("crop_scale"), crop_ratio=get("crop_ratio"),
        flip_prob=float(get("flip_prob")), jitter_strength=float(get("jitter_strength")),
        jitter_prob=float(get("jitter_prob")), gray_prob=float(get("gray_prob")),
        blur_prob=per_view("blur_prob"), blur_sigma=get("blur_sigma"),
        solarize_prob=per_view("solarize_prob"), solarize_threshold=float(get("solarize_threshold")),
        mean=get("mean"), std=get("std"))


def _check_fields_present(cfg: Mapping[str, Any]) -> None:
    missing = [f"augment.{field.name}" for field in dataclasses.fields(AugmentParams) if field.name not in cfg]
    if missing:
        raise ValueError(f"{', '.join(missing)} missing from the augment config; pass every field "
                         "(as in clrjax.config.base_config().augment).")


# --------------------------------------------------------------------------- geometry


def sample_crop_box(key: jax.Array, height: int, width: int, scale: Sequence[float],
                    ratio: Sequence[float]) -> jax.Array:
    """A random-resized-crop box (top, left, h, w) in pixels, float32 [4].

    Inception-style sampling (Szegedy et al. 2015; SimCLR app. A): area
    fraction a ~ U(scale), log(w/h) ~ U(log ratio), h = sqrt(a*H*W / r),
    w = sqrt(a*H*W * r). Of :data:`CROP_ATTEMPTS` candidates the first that
    fits inside the image is used; if none fits, the largest centred crop
    with the aspect ratio clamped to ``ratio`` (torchvision's fallback).
    Offsets are continuous, ~ U(0, H - h) and U(0, W - w).
    """
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = height * width * jax.random.uniform(k_area, (CROP_ATTEMPTS,), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(k_ratio, (CROP_ATTEMPTS,), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    r = jnp.exp(log_r)
    w, h = jnp.sqrt(area * r), jnp.sqrt(area / r)
    fits = (w <= width) & (h <= height)
    first = jnp.argmax(fits)  # index of the first candidate that fits (0 if none)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = float(width), width / ratio[0]
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = height * ratio[1], float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    any_fits = jnp.any(fits)
    h = jnp.where(any_fits, h[first], fallback_h)
    w = jnp.where(any_fits, w[first], fallback_w)
    top = jnp.where(any_fits, jax.random.uniform(k_top) * (height - h), (height - h) / 2)
    left = jnp.where(any_fits, jax.random.uniform(k_left) * (width - w), (width - w) / 2)
    return jnp.stack([top, left, h, w]).astype(jnp.float32)


def crop_and_resize(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
    """Crops ``box`` = (top, left, h, w) from float [H, W, C] and resizes it to [size, size, C].

    One ``jax.image.scale_and_translate`` (bilinear, antialiased when
    shrinking): output coordinate = (input coordinate - corner) * size / extent.
    Interpolation weights are non-negative and sum to one, so values stay in
    the input's range and a constant image stays constant.
    """
    top, left, h, w = box[0], box[1], box[2], box[3]
    scale = jnp.stack([size / h, size / w])
    translation = jnp.stack([-top * size / h, -left * size / w])
    return jax.image.scale_and_translate(image, (size, size, image.shape[-1]), (0, 1), scale, translation,
                                         method="linear", antialias=True)


def random_resized_crop(image: jax.Array, key: jax.Array, size: int, scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> jax.Array:
    """float [H, W, C] -> float [size, size, C]: :func:`sample_crop_box` then :func:`crop_and_resize`."""
    box = sample_crop_box(key, image.shape[0], image.shape[1], scale, ratio)
    return crop_and_resize(image, box, size)


def horizontal_flip(image: jax.Array) -> jax.Array:
    """Mirror along the width axis: out[:, j] = in[:, W - 1 - j]."""
    return image[:, ::-1]


# --------------------------------------------------------------------------- colour


def to_grayscale(image: jax.Array) -> jax.Array:
    """Luma Y = 0.299 R + 0.587 G + 0.114 B repeated over the 3 channels; identity for C = 1."""
    if image.shape[-1] == 1:
        return image
    luma = image @ jnp.asarray(LUMA, image.dtype)
    return jnp.repeat(luma[..., None], image.shape[-1], axis=-1)


def _luma(image: jax.Array) -> jax.Array:
    return image[..., 0] if image.shape[-1] == 1 else image @ jnp.asarray(LUMA, image.dtype)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
    """x * factor (multiplicative, as torchvision and SimCLR v2's colour jitter)."""
    return jnp.clip(image * factor, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
    """(x - m) * factor + m, m = mean luma of the image (torchvision)."""
    m = jnp.mean(_luma(image))
    return jnp.clip((image - m) * factor + m, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
    """Blend with the grayscale image: Y + (x - Y) * factor; identity for C = 1."""
    if image.shape[-1] == 1:
        return image
    gray = _luma(image)[..., None]
    return jnp.clip(gray + (image - gray) * factor, 0.0, 1.0)


def rgb_to_hsv(rgb: jax.Array) -> jax.Array:
    """[..., 3] RGB in [0, 1] -> HSV in [0, 1] (hue as a fraction of a turn)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = jnp.max(rgb, axis=-1)
    delta = value - jnp.min(rgb, axis=-1)
    saturation = jnp.where(value > 0, delta / jnp.where(value > 0, value, 1.0), 0.0)
    safe = jnp.where(delta > 0, delta, 1.0)
    hue = jnp.where(value == r, (g - b) / safe,
                    jnp.where(value == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = jnp.where(delta > 0, jnp.mod(hue / 6.0, 1.0), 0.0)
    return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(hsv: jax.Array) -> jax.Array:
    """Inverse of :func:`rgb_to_hsv`: channel n in (5, 3, 1) is V - V S clip(min(k, 4 - k), 0, 1),
    k = (n + 6 H) mod 6 (the closed form of the piecewise HSV definition)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    channels = []
    for n in (5.0, 3.0, 1.0):  # R, G, B
        k = jnp.mod(n + 6.0 * h, 6.0)
        channels.append(v - v * s * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.stack(channels, axis=-1)


def adjust_hue(image: jax.Array, delta) -> jax.Array:
    """Rotates the hue by ``delta`` turns (delta in [-0.5, 0.5]); identity for C = 1."""
    if image.shape[-1] == 1:
        return image
    hsv = rgb_to_hsv(image)
    hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + delta, 1.0))
    return jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)


def color_jitter(image: jax.Array, key: jax.Array, strength: float) -> jax.Array:
    """SimCLR colour distortion (appendix A) with strength s.

    brightness factor ~ U(max(0, 1 - 0.8s), 1 + 0.8s), contrast and
    saturation factors likewise, hue shift ~ U(-0.2s, 0.2s) turns. Applied in
    the fixed order brightness, contrast, saturation, hue. SimCLR and
    torchvision shuffle the order; we do not, because under ``vmap`` a
    per-example order (``lax.switch``) evaluates all four ops at each of the
    four stages, quadrupling the cost for a minor change in the distribution.
    """
    kb, kc, ks, kh = jax.random.split(key, 4)
    low, high = max(0.0, 1.0 - 0.8 * strength), 1.0 + 0.8 * strength
    x = adjust_brightness(image, jax.random.uniform(kb, minval=low, maxval=high))
    x = adjust_contrast(x, jax.random.uniform(kc, minval=low, maxval=high))
    x = adjust_saturation(x, jax.random.uniform(ks, minval=low, maxval=high))
    hue = min(0.5, 0.2 * strength)
    return adjust_hue(x, jax.random.uniform(kh, minval=-hue, maxval=hue))


# --------------------------------------------------------------------------- blur, solarise, normalise


def blur_radius(size: int) -> int:
    """Kernel radius for an image of side ``size``: kernel 2r + 1 ~ 10% of the side.

    r = max(1, (size // 10) // 2) as in SimCLR's code; size 224 gives the
    23-pixel kernel of BYOL table 6.
    """
    return max(1, (size // 10) // 2)


def gaussian_kernel(sigma, radius: int) -> jax.Array:
    """Normalised 1-D Gaussian weights exp(-t^2 / (2 sigma^2)), t = -r..r: float32 [2r + 1]."""
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-(t ** 2) / (2.0 * jnp.square(sigma)))
    return w / jnp.sum(w)


def _blur_axis(image: jax.Array, kernel: jax.Array, axis: int) -> jax.Array:
    """1-D convolution along ``axis`` with reflect padding, as a banded-matrix product.

    band[i, j] = kernel[j - i] for 0 <= j - i <= 2r over the padded axis; a
    matrix product vectorises under vmap where a per-example conv would not.
    """
    radius = (kernel.shape[0] - 1) // 2
    n = image.shape[axis]
    pad = [(0, 0)] * image.ndim
    pad[axis] = (radius, radius)
    padded = jnp.pad(image, pad, mode="reflect")
    offset = jnp.arange(n + 2 * radius)[None, :] - jnp.arange(n)[:, None]
    band = jnp.where((offset >= 0) & (offset <= 2 * radius),
                     kernel[jnp.clip(offset, 0, 2 * radius)], 0.0)
    moved = jnp.moveaxis(padded, axis, 0)
    out = jnp.tensordot(band, moved, axes=(1, 0), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(out, 0, axis)


def gaussian_blur(image: jax.Array, sigma, radius: int) -> jax.Array:
    """Separable Gaussian blur of float [H, W, C] (reflect padding; weights sum to 1,
    so the mean of a constant image is preserved). Needs radius < min(H, W)."""
    kernel = gaussian_kernel(sigma, radius)
    return _blur_axis(_blur_axis(image, kernel, 0), kernel, 1)


def solarize(image: jax.Array, threshold: float = 0.5) -> jax.Array:
    """x if x < threshold else 1 - x (BYOL, for values in [0, 1])."""
    return jnp.where(image < threshold, image, 1.0 - image)


def _channel_stats(values: Sequence[float], channels: int, name: str) -> jax.Array:
    values = tuple(values)
    if len(values) == channels:
        return jnp.asarray(values, jnp.float32)
    if len(values) == 1 or channels == 1:
        # A 1-channel image takes the average of 3-channel statistics.
        return jnp.full((channels,), sum(values) / len(values), jnp.float32)
    raise ValueError(f"augment.{name} has {len(values)} values but images have {channels} channels")


def normalize(image: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """(x - mean) / std per channel (last axis)."""
    c = image.shape[-1]
    return (image - _channel_stats(mean, c, "mean")) / _channel_stats(std, c, "std")


# --------------------------------------------------------------------------- one view, a batch


def _maybe(key: jax.Array, prob: float, op, image: jax.Array) -> jax.Array:
    """op(image) with probability ``prob``; the branch is skipped at trace time for 0 and 1."""
    if prob <= 0.0:
        return image
    if prob >= 1.0:
        return op(image)
    return jnp.where(jax.random.bernoulli(key, prob), op(image), image)


def augment_view(image_u8: jax.Array, key: jax.Array, cfg: Mapping[str, Any], view: int,
                 normalise: bool = True) -> jax.Array:
    """One augmented view of one example: uint8 [H, W, C] -> float32 [S, S, C].

    ``key`` is this example's key (``augment_batch`` folds in the example
    index); the view number is folded in here. ``view`` (0 or 1) is a Python
    int: it selects the per-view blur and solarisation probabilities.
    With ``normalise=False`` the result is the [0, 1] image before step 7.
    """
    p = augment_params(cfg)
    keys = jax.random.split(jax.random.fold_in(key, view), 9)
    x = image_u8.astype(jnp.float32) / 255.0
    x = random_resized_crop(x, keys[0], p.crop_size, p.crop_scale, p.crop_ratio)
    x = jnp.clip(x, 0.0, 1.0)
    x = _maybe(keys[1], p.flip_prob, horizontal_flip, x)
    x = _maybe(keys[2], p.jitter_prob, lambda y: color_jitter(y, keys[3], p.jitter_strength), x)
    x = _maybe(keys[4], p.gray_prob, to_grayscale, x)
    sigma = jax.random.uniform(keys[6], minval=p.blur_sigma[0], maxval=p.blur_sigma[1])
    x = _maybe(keys[5], p.blur_prob[view], lambda y: gaussian_blur(y, sigma, blur_radius(p.crop_size)), x)
    x = _maybe(keys[7], p.solarize_prob[view], lambda y: solarize(y, p.solarize_threshold), x)
    return normalize(x, p.mean, p.std) if normalise else x


def augment_batch(images_u8: jax.Array, example_index: jax.Array, key: jax.Array, cfg: Mapping[str, Any],
                  view: int, normalise: bool = True) -> jax.Array:
    """uint8 [B, H, W, C], int32 [B] -> float32 [B, S, S, C].

    Example b uses key ``fold_in(key, example_index[b])`` (then the view), so
    its result does not depend on B, on its position, or on the sharding.
    """
    def one(image, index):
        return augment_view(image, jax.random.fold_in(key, index), cfg, view, normalise)
    return jax.vmap(one)(images_u8, example_index)


def views(images_u8: jax.Array, example_index: jax.Array, key: jax.Array, cfg: Mapping[str, Any],
          num_views: int = 2, normalise: bool = True) -> jax.Array:
    """uint8 [B, H, W, C] -> float32 [B, V, S, S, C]: view v of example b at [b, v].

    View v has its own key (folded in by :func:`augment_view`) and the
    per-view blur and solarisation probabilities (BYOL's asymmetric views).
    Keeping the views of one example adjacent keeps each device's rows on
    that device, so the networks need no communication beyond BatchNorm's sums.
    """
    return jnp.stack([augment_batch(images_u8, example_index, key, cfg, v, normalise)
                      for v in range(num_views)], axis=1)


def preprocess_eval(images_u8: jax.Array, cfg: Mapping[str, Any]) -> jax.Array:
    """Deterministic evaluation input: uint8 [B, H, W, C] -> float32 [B, S, S, C].

    Centre square crop of the shorter side, bilinear antialiased resize to
    S = crop_size (identity when the image is already S x S), normalise.
    """
    p = augment_params(cfg)
    _, h, w, c = images_u8.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = images_u8[:, top:top + side, left:left + side].astype(jnp.float32) / 255.0
    if side != p.crop_size:
        x = jax.image.resize(x, (x.shape[0], p.crop_size, p.crop_size, c), method="linear", antialias=True)
        x = jnp.clip(x, 0.0, 1.0)
    return normalize(x, p.mean, p.std)
