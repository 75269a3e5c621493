"""On-device augmentations: shapes, ranges, keys, sharding independence, and each op's defining property.

Compilation dominates on 2 CPU cores, so batches are tiny and most op tests run eagerly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clrjax.config import base_config
from clrjax.data import augment as A

CFG = dict(base_config().augment.to_dict(), crop_size=12)
KEY = jax.random.key(0)


def random_images(b, h, w, c, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, 256, (b, h, w, c), dtype=np.uint8))


# only deterministic ops: used to test single ops inside the full view function
NO_OPS = dict(CFG, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_prob=0.0, jitter_prob=0.0, gray_prob=0.0,
              blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))


def _two_unit_views(images, index, key):
    both = A.views(images, index, key, CFG, normalise=False)
    return both[:, 0], both[:, 1]


# One compiled function shared by the tests below: compiling the full pipeline
# costs seconds on 2 CPU cores, running it microseconds.
TWO_VIEWS = jax.jit(_two_unit_views)


@pytest.fixture(scope="module")
def batch8():
    return random_images(8, 16, 14, 3), jnp.arange(100, 108, dtype=jnp.int32)


@pytest.fixture(scope="module")
def views(batch8):
    return TWO_VIEWS(*batch8, KEY)


def test_shapes_dtypes_and_unit_range(views):
    for view in views:
        assert view.shape == (8, 12, 12, 3) and view.dtype == jnp.float32
        assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0


def test_one_channel_images():
    gray = random_images(4, 10, 10, 1)
    cfg = dict(CFG, mean=(0.5,), std=(0.25,))
    both = jax.jit(lambda im, ix: A.views(im, ix, KEY, cfg))(gray, jnp.arange(4))
    a, b = both[:, 0], both[:, 1]
    assert a.shape == b.shape == (4, 12, 12, 1) and a.dtype == jnp.float32
    unit = a * 0.25 + 0.5  # undo the normalisation: the [0, 1] image
    assert float(unit.min()) >= -1e-6 and float(unit.max()) <= 1.0 + 1e-6
    assert not np.allclose(a, b)


def test_normalize():
    x = jnp.ones((2, 2, 3)) * jnp.array([0.2, 0.5, 0.8])
    np.testing.assert_allclose(A.normalize(x, (0.2, 0.4, 0.6), (0.1, 0.2, 0.4)), jnp.ones((2, 2, 3)) * jnp.array(
        [0.0, 0.5, 0.5]), atol=1e-6)
    # a 1-channel image takes the average of 3-channel statistics
    np.testing.assert_allclose(A.normalize(jnp.ones((2, 2, 1)), (0.2, 0.4, 0.6), (0.5, 0.5, 0.5)), 1.2, atol=1e-6)
    with pytest.raises(ValueError, match="augment.mean has 2 values"):
        A.normalize(x, (0.1, 0.2), (1.0,))


def test_deterministic_per_key_and_index(batch8, views):
    images, index = batch8
    np.testing.assert_array_equal(TWO_VIEWS(images, index, KEY)[0], views[0])
    assert not np.allclose(TWO_VIEWS(images, index + 8, KEY)[0], views[0])  # other counters, other views
    assert not np.allclose(TWO_VIEWS(images, index, jax.random.key(1))[0], views[0])
    same_image = jnp.broadcast_to(images[:1], images.shape)
    out = TWO_VIEWS(same_image, index, KEY)[0]
    assert not np.allclose(out[0], out[1])  # same pixels, different example index -> different view


def test_views_differ(views):
    assert not np.allclose(views[0], views[1])
    for row in range(8):  # each example's two views differ, not just the batch as a whole
        assert not np.allclose(views[0][row], views[1][row])


def test_independent_of_batch_sharding_and_subset(batch8, views):
    images, index = batch8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8
    shard = NamedSharding(mesh, PartitionSpec("data"))
    sharded = TWO_VIEWS(jax.device_put(images, shard), jax.device_put(index, shard), KEY)
    for got, want in zip(sharded, views):
        assert len(got.sharding.device_set) == 8
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    # rows 2..4 in another batch (other neighbours, other positions) give the same views;
    # the same batch shape reuses the compiled function
    others = random_images(5, 16, 14, 3, seed=9)
    mixed_images = jnp.concatenate([others[:2], images[2:5], others[2:]])
    mixed_index = jnp.concatenate([jnp.arange(900, 902), index[2:5], jnp.arange(902, 905)]).astype(jnp.int32)
    mixed = TWO_VIEWS(mixed_images, mixed_index, KEY)
    for got, want in zip(mixed, views):
        np.testing.assert_allclose(got[2:5], want[2:5], atol=1e-5)


def test_crop_box_obeys_scale_and_ratio():
    keys = jax.random.split(jax.random.key(3), 256)
    boxes = jax.jit(jax.vmap(lambda k: A.sample_crop_box(k, 40, 60, (0.08, 1.0), (3 / 4, 4 / 3))))(keys)
    top, left, h, w = np.asarray(boxes).T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= 40 + 1e-3) and np.all(left + w <= 60 + 1e-3)
    ratio, area = w / h, h * w / (40 * 60)
    fitted = area < 1.0 - 1e-6  # the rare fallback is the full height with ratio 4/3
    assert np.all((ratio > 3 / 4 - 1e-4) & (ratio < 4 / 3 + 1e-4))
    assert np.all(area[fitted] >= 0.08 - 1e-4)
    assert area.min() < 0.3 and area.max() > 0.7  # the range is actually explored


def test_full_crop_is_identity_and_constant_stays_constant():
    x = random_images(1, 12, 12, 3)[0]
    unit = A.augment_view(x, KEY, NO_OPS, 0, normalise=False)
    np.testing.assert_allclose(unit, x / 255.0, atol=1e-6)  # scale 1, ratio 1, same size -> the image
    constant = jnp.full((20, 30, 3), 77, jnp.uint8)
    for cfg in (NO_OPS, dict(NO_OPS, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))):
        out = A.augment_view(constant, KEY, cfg, 0, normalise=False)
        np.testing.assert_allclose(out, 77 / 255.0, atol=1e-6)


def test_flip_is_a_mirror():
    x = random_images(1, 12, 12, 3)[0]
    np.testing.assert_array_equal(A.horizontal_flip(x), np.asarray(x)[:, ::-1])
    flipped = A.augment_view(x, KEY, dict(NO_OPS, flip_prob=1.0), 0, normalise=False)
    np.testing.assert_allclose(flipped, np.asarray(x)[:, ::-1] / 255.0, atol=1e-6)


def test_grayscale_has_equal_channels_and_luma():
    x = random_images(1, 6, 6, 3)[0] / 255.0
    g = A.to_grayscale(x)
    np.testing.assert_allclose(g[..., 0], g[..., 1]) and np.testing.assert_allclose(g[..., 1], g[..., 2])
    np.testing.assert_allclose(g[..., 0], x @ jnp.array([0.299, 0.587, 0.114]), atol=1e-6)
    out = A.augment_view(random_images(1, 12, 12, 3)[0], KEY, dict(NO_OPS, gray_prob=1.0), 0, normalise=False)
    np.testing.assert_allclose(out[..., 0], out[..., 2], atol=1e-6)
    one = x[..., :1]
    np.testing.assert_array_equal(A.to_grayscale(one), one)


def test_solarize_inverts_pixels_above_threshold():
    x = jnp.linspace(0.0, 1.0, 11)
    out = A.solarize(x, 0.5)
    np.testing.assert_allclose(out, np.where(x < 0.5, x, 1 - x), atol=1e-7)
    image = random_images(1, 12, 12, 3)[0]
    view1 = A.augment_view(image, KEY, dict(NO_OPS, solarize_prob=(0.0, 1.0)), 1, normalise=False)
    view0 = A.augment_view(image, KEY, dict(NO_OPS, solarize_prob=(0.0, 1.0)), 0, normalise=False)
    unit = image / 255.0
    np.testing.assert_allclose(view1, jnp.where(unit < 0.5, unit, 1 - unit), atol=1e-6)
    np.testing.assert_allclose(view0, unit, atol=1e-6)  # per-view probability 0 for view 0


def test_blur_preserves_constant_and_mass_and_smooths():
    blur = jax.jit(A.gaussian_blur, static_argnums=2)  # one compile per shape instead of one per primitive
    constant = jnp.full((12, 12, 3), 0.3)
    np.testing.assert_allclose(blur(constant, 1.5, 3), 0.3, atol=1e-6)
    delta = jnp.zeros((15, 15, 1)).at[7, 7, 0].set(1.0)
    out = blur(delta, 1.0, 3)
    np.testing.assert_allclose(float(out.sum()), 1.0, atol=1e-5)  # interior: nothing reflected
    assert float(out.max()) < 0.25 and float(out[7, 7, 0]) == float(out.max())
    np.testing.assert_allclose(out[:, :, 0], out[:, :, 0].T, atol=1e-7)  # isotropic
    k = A.gaussian_kernel(2.0, 11)
    assert k.shape == (23,) and abs(float(k.sum()) - 1) < 1e-6 and A.blur_radius(224) == 11
    view = A.augment_view(jnp.full((12, 12, 3), 50, jnp.uint8), KEY, dict(NO_OPS, blur_prob=(1.0, 1.0)), 0,
                          normalise=False)
    np.testing.assert_allclose(view, 50 / 255.0, atol=1e-6)


def test_color_ops():
    x = random_images(1, 8, 8, 3, seed=5)[0] / 255.0
    np.testing.assert_allclose(A.hsv_to_rgb(A.rgb_to_hsv(x)), x, atol=1e-5)
    np.testing.assert_allclose(A.adjust_hue(x, 0.0), x, atol=1e-5)
    red = jnp.array([[[1.0, 0.0, 0.0]]])
    np.testing.assert_allclose(A.adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-5)  # 120 degrees
    np.testing.assert_allclose(A.adjust_saturation(x, 0.0), A.to_grayscale(x), atol=1e-6)
    np.testing.assert_allclose(A.adjust_brightness(x, 0.5), x * 0.5, atol=1e-7)
    flat = A.adjust_contrast(x, 0.0)
    np.testing.assert_allclose(flat, jnp.full_like(x, jnp.mean(x @ jnp.array(A.LUMA))), atol=1e-6)
    # 1 channel: saturation and hue are identities, jitter stays in [0, 1]
    one = x[..., :1]
    np.testing.assert_array_equal(A.adjust_saturation(one, 0.0), one)
    np.testing.assert_array_equal(A.adjust_hue(one, 0.3), one)
    jittered = A.color_jitter(one, KEY, 1.0)
    assert jittered.shape == one.shape and 0.0 <= float(jittered.min()) and float(jittered.max()) <= 1.0


def test_preprocess_eval():
    x = random_images(2, 12, 12, 3)
    out = A.preprocess_eval(x, CFG)
    mean, std = np.array(CFG["mean"]), np.array(CFG["std"])
    np.testing.assert_allclose(out, (np.asarray(x) / 255.0 - mean) / std, atol=1e-5)  # already S x S
    wide = A.preprocess_eval(random_images(2, 20, 30, 3), CFG)
    assert wide.shape == (2, 12, 12, 3) and wide.dtype == jnp.float32
    np.testing.assert_array_equal(wide, A.preprocess_eval(random_images(2, 20, 30, 3), CFG))


def test_missing_field_is_an_error_naming_it():
    # No library fallback: a default here could disagree with clrjax.config's.
    with pytest.raises(ValueError, match=r"augment\.crop_size missing"):
        A.augment_params({name: value for name, value in CFG.items() if name != "crop_size"})
