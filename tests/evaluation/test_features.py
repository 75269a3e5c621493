"""extract_features: sharded over 8 simulated devices == one device == NumPy; padding dropped."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from clrjax.evaluation.features import extract_features, place_batch
from clrjax.parallel import batch_sharding

NUM_DEVICES = 8


def make_batches(images, labels, batch_size, pad_value=255):
    """Yields fixed-size batches; the last is padded with junk rows marked mask=False."""
    n = len(labels)
    for start in range(0, n, batch_size):
        img = images[start : start + batch_size]
        lab = labels[start : start + batch_size]
        valid = len(lab)
        pad = batch_size - valid
        if pad:
            img = np.concatenate([img, np.full((pad,) + img.shape[1:], pad_value, img.dtype)])
            lab = np.concatenate([lab, np.full((pad,), -1, lab.dtype)])
        yield {"image": img, "label": lab, "mask": np.arange(batch_size) < valid}


def conv_encoder(seed=0):
    """A tiny conv -> relu -> global-mean-pool -> dense encoder on uint8 NHWC images."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    kernel = jax.random.normal(k1, (3, 3, 3, 8)) * 0.3
    dense = jax.random.normal(k2, (8, 5))

    def encode(images):
        x = images.astype(jnp.float32) / 255.0
        y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jax.nn.relu(y).mean(axis=(1, 2)) @ dense

    return encode


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) == NUM_DEVICES, "tests/conftest.py should simulate 8 CPU devices"
    return Mesh(np.array(jax.devices()), ("data",))


def test_sharded_equals_one_device_conv(mesh):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (37, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 37).astype(np.int32)
    encode = conv_encoder()
    one, one_labels = extract_features(encode, make_batches(images, labels, 16), progress=False)
    sharded, sharded_labels = extract_features(encode, make_batches(images, labels, 16), mesh=mesh, progress=False)
    assert one.shape == (37, 5) and one.dtype == np.float32
    np.testing.assert_allclose(sharded, one, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(sharded_labels, labels)
    np.testing.assert_array_equal(one_labels, labels)


def test_linear_encoder_matches_numpy_and_drops_padding(mesh):
    """Independent reference: features = images @ W in float64; padding rows (value 255, label -1) gone."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(29, 12)).astype(np.float32)
    labels = rng.integers(0, 3, 29).astype(np.int32)
    weights = rng.normal(size=(12, 4)).astype(np.float32)
    feats, out_labels = extract_features(
        lambda x: x @ weights, make_batches(images, labels, 8), mesh=mesh, progress=False
    )
    assert feats.shape == (29, 4) and out_labels.dtype == np.int32
    np.testing.assert_allclose(feats, images.astype(np.float64) @ weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out_labels, labels)


def test_batches_are_placed_sharded(mesh):
    array = place_batch(np.zeros((16, 3), np.float32), batch_sharding(mesh))
    assert len(array.sharding.device_set) == NUM_DEVICES
    assert array.addressable_shards[0].data.shape == (2, 3)


def test_indivisible_batch_and_bad_mesh_fail_clearly(mesh):
    batch = {"image": np.zeros((12, 3), np.float32), "label": np.zeros(12, np.int32)}
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        extract_features(lambda x: x, [batch], mesh=mesh, progress=False)
    other = Mesh(np.array(jax.devices()), ("batch",))
    with pytest.raises(ValueError, match="'data' axis"):
        extract_features(lambda x: x, [batch], mesh=other, progress=False)


def test_progress_line_on_stderr(capsys):
    batch = {"image": np.ones((4, 2), np.float32), "label": np.arange(4)}
    feats, labels = extract_features(lambda x: 2 * x, [batch, batch], progress=True)
    err = capsys.readouterr().err
    assert "extract_features: batch 2/2, 8 examples" in err
    # Batches are counted once their features reach the host; the first (compilation) shows no rate.
    assert err.lstrip("\r").startswith("extract_features: batch 1/2, 4 examples | - img/s | ETA ?")
    np.testing.assert_array_equal(feats, 2 * np.ones((8, 2)))


def test_variables_passed_as_an_argument_equal_the_closure_and_compile_once(mesh):
    """The parameters are an argument of the compiled function: same features, no recompilation
    for new parameter values (a closure would embed them as constants of a new program)."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (21, 6, 6, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 21).astype(np.int32)

    def encode(variables, images):
        x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
        return jnp.tanh(x @ variables["w"])

    compiles = []

    def counted(variables, images):  # traced once per compilation
        compiles.append(1)
        return encode(variables, images)

    for seed in (0, 1):
        variables = {"w": jnp.asarray(rng.normal(size=(108, 4)), jnp.float32)}
        got, _ = extract_features(counted, make_batches(images, labels, 8), mesh=mesh, progress=False,
                                  variables=variables)
        closed, _ = extract_features(lambda im: encode(variables, im), make_batches(images, labels, 8),
                                     mesh=mesh, progress=False)
        x = images.reshape(21, -1).astype(np.float64) / 255.0
        np.testing.assert_allclose(got, np.tanh(x @ np.asarray(variables["w"], np.float64)), atol=1e-5)
        np.testing.assert_array_equal(got, closed)
    assert len(compiles) == 1, f"traced {len(compiles)} times for two parameter values"
