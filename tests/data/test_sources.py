"""Sources: digits, Fashion-MNIST IDX (real and corrupt), synthetic, and a locally built TFDS dataset.

Nothing here touches the network: the TFDS dataset is generated into tmp_path
from a builder defined below (array_record, no TensorFlow).
"""
import gzip
import io
import os
import struct

import numpy as np
import pytest

from clrjax.data import sources
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import DataError, dataset_info, load_source

FASHION_DIR = sources.DEFAULT_FASHION_MNIST_DIR


# --------------------------------------------------------------------------- digits


def test_digits_shapes_labels_and_stratified_split():
    train, test = load_source({"name": "digits"}, "train"), load_source({"name": "digits"}, "test")
    assert (len(train), len(test)) == (1438, 359)  # 1,797 split 80/20 within each class
    batch = train[np.arange(len(train))]
    assert batch["image"].shape == (1438, 8, 8, 1) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32 and set(batch["label"].tolist()) == set(range(10))
    assert batch["image"].max() == 255 and batch["image"].min() == 0  # 0..16 rescaled to 0..255
    assert train.image_shape == (8, 8, 1) and train.num_classes == 10
    test_counts = np.bincount(test[np.arange(len(test))]["label"], minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # ~20% of each class's ~180
    # deterministic, and the two splits are disjoint and complete
    train_idx, test_idx = sources.stratified_split(np.repeat(np.arange(10), 180), 0.2, 0)
    np.testing.assert_array_equal(train_idx, sources.stratified_split(np.repeat(np.arange(10), 180), 0.2, 0)[0])
    assert len(np.intersect1d(train_idx, test_idx)) == 0 and len(train_idx) + len(test_idx) == 1800
    assert dataset_info({"name": "digits"}) == ((8, 8, 1), 10)


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.skipif(not os.path.exists(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz")),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_real_files():
    for split, n in (("train", 60000), ("test", 10000)):
        src = load_source({"name": "fashion_mnist", "data_dir": ""}, split)
        assert len(src) == n and src.image_shape == (28, 28, 1) and src.num_classes == 10
        batch = src[np.arange(0, n, 97)]
        assert batch["image"].dtype == np.uint8 and batch["image"].shape[1:] == (28, 28, 1)
        assert batch["label"].min() == 0 and batch["label"].max() == 9
    assert dataset_info({"name": "fashion_mnist"}) == ((28, 28, 1), 10)


def idx_bytes(array, magic_type=0x08):
    header = struct.pack(">HBB", 0, magic_type, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion(directory, n_test=5, corrupt=None):
    """Writes valid test-split IDX .gz files; ``corrupt`` = (file, bytes) replaces one file's content."""
    rng = np.random.default_rng(0)
    files = {"t10k-images-idx3-ubyte.gz": idx_bytes(rng.integers(0, 256, (n_test, 28, 28))),
             "t10k-labels-idx1-ubyte.gz": idx_bytes(np.arange(n_test) % 10)}
    if corrupt:
        files[corrupt[0]] = corrupt[1]
    for name, raw in files.items():
        with gzip.open(os.path.join(directory, name), "wb") as f:
            f.write(raw)
    return files


def test_fashion_mnist_reader_validates_idx(tmp_path, monkeypatch):
    # a well-formed file is read back exactly (expected split size patched to 5)
    monkeypatch.setitem(sources.FASHION_MNIST_FILES, "test", ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 5))
    write_fake_fashion(tmp_path)
    src = sources.load_fashion_mnist("test", str(tmp_path))
    np.testing.assert_array_equal(src[np.arange(5)]["label"], np.arange(5))

    images = idx_bytes(np.zeros((5, 28, 28)))
    bad_magic = images[:2] + b"\x09" + images[3:]  # type code 0x09 (signed byte) instead of 0x08
    cases = {
        "bad magic": ("t10k-images-idx3-ubyte.gz", bad_magic, "magic number 0x00000903"),
        "truncated payload": ("t10k-images-idx3-ubyte.gz", images[:-100], "truncated"),
        "wrong dims": ("t10k-labels-idx1-ubyte.gz", idx_bytes(np.zeros((5, 2))), "magic number"),
    }
    for problem, (name, raw, message) in cases.items():
        write_fake_fashion(tmp_path, corrupt=(name, raw))
        with pytest.raises(DataError, match=message) as info:
            sources.load_fashion_mnist("test", str(tmp_path))
        assert name in str(info.value) and "apt-get install dataset-fashion-mnist" in str(info.value), problem

    # a truncated gzip stream (download cut short) and a non-gzip file
    write_fake_fashion(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(DataError, match="cannot be read"):
        sources.load_fashion_mnist("test", str(tmp_path))
    path.write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: cannot be read"):
        sources.load_fashion_mnist("test", str(tmp_path))


def test_fashion_mnist_missing_dir_names_file_and_fix(tmp_path):
    with pytest.raises(DataError) as info:
        load_source({"name": "fashion_mnist", "data_dir": str(tmp_path / "nowhere")}, "train")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz does not exist" in message
    assert "apt-get install dataset-fashion-mnist" in message and "--config.dataset.data_dir" in message


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_any_shape():
    cfg = {"name": "synthetic", "image_size": 20, "channels": 5, "num_examples": 33}
    a, b = load_source(cfg, "train"), load_source(cfg, "train")
    idx = np.array([0, 7, 32, 7])
    x = a[idx]
    assert x["image"].shape == (4, 20, 20, 5) and x["image"].dtype == np.uint8 and len(a) == 33
    np.testing.assert_array_equal(x["image"], b[idx]["image"])
    np.testing.assert_array_equal(x["image"][1], x["image"][3])
    assert x["label"].dtype == np.int32 and x["label"].max() < 10
    assert not np.array_equal(load_source(cfg, "test")[idx]["image"], x["image"])
    assert dataset_info(cfg) == ((20, 20, 5), 10)
    with pytest.raises(IndexError):
        a[np.array([33])]


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_source({"name": "mnist"}, "train")
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        load_source({"name": "digits"}, "validation")


def test_dataset_info_for_tfds_names_needs_no_data():
    assert dataset_info({"name": "cifar100", "image_size": 0}) == ((32, 32, 3), 100)
    assert dataset_info({"name": "imagenet2012", "image_size": 0}) == ((256, 256, 3), 1000)
    assert dataset_info({"name": "imagenette", "image_size": 160}) == ((160, 160, 3), 10)


# --------------------------------------------------------------------------- TFDS (local array_record)


def _define_builders():
    """Two tiny builders: variable-size PNG images (Image feature) and fixed uint8 tensors."""
    import tensorflow_datasets as tfds
    from PIL import Image

    def png(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return buffer.getvalue()  # encoded bytes: the Image feature then needs no TensorFlow

    class ClrjaxTinyVariable(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(num_classes=5)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24, 0), "test": self._generate_examples(6, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                h, w = rng.integers(10, 30, size=2)
                # constant image with value 10*i: the content identifies the example after resizing
                yield i, {"image": png(np.full((h, w, 3), 10 * i, np.uint8)), "label": i % 5}

    class ClrjaxTinyFixed(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(6, 6, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(20)}

        def _generate_examples(self, n):
            for i in range(n):
                yield i, {"image": np.full((6, 6, 3), i, np.uint8), "label": i % 3}

    return tfds, ClrjaxTinyVariable, ClrjaxTinyFixed


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds, variable, fixed = _define_builders()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    for builder in (variable, fixed):
        builder(data_dir=data_dir, file_format="array_record").download_and_prepare(download_config=config)
    return data_dir


def test_tfds_variable_size_images_are_decoded_and_resized(tfds_dir):
    src = sources.TfdsSource("clrjax_tiny_variable", "train", tfds_dir, image_size=16)
    assert len(src) == 24 and src.image_shape == (16, 16, 3) and src.num_classes == 5
    batch = src[np.array([3, 0, 17])]
    assert batch["image"].shape == (3, 16, 16, 3) and batch["image"].dtype == np.uint8
    # TFDS stores records in hashed-key order, so check consistency, not positions:
    # example i is the constant image 10*i with label i % 5, and rows follow the request order.
    for row, i in enumerate([3, 0, 17]):
        one = src[i]
        np.testing.assert_array_equal(batch["image"][row], one["image"])
        assert batch["label"][row] == one["label"] == (one["image"][0, 0, 0] // 10) % 5
    assert np.all(batch["image"] == batch["image"][:, :1, :1, :1])  # resize kept the constant images
    # TFDS split strings pass through; 0 = default host size for variable-size images
    assert len(sources.TfdsSource("clrjax_tiny_variable", "train[:50%]", tfds_dir)) == 12
    assert sources.TfdsSource("clrjax_tiny_variable", "test", tfds_dir).image_shape == (256, 256, 3)


def test_tfds_fixed_size_source_and_per_process_split(tfds_dir):
    src = sources.TfdsSource("clrjax_tiny_fixed", "train", tfds_dir)
    assert src.image_shape == (6, 6, 3) and src.num_classes == 3
    reference = TrainLoader(src, 8, seed=0, prefetch=0)
    halves = [TrainLoader(src, 8, seed=0, process_index=p, process_count=2, prefetch=1) for p in range(2)]
    for step in range(3):  # 20 // 8 = 2 steps per epoch: step 2 is in epoch 1
        parts = [next(h) for h in halves]
        assert parts[0]["image"].shape == (4, 6, 6, 3)
        want = reference.batch_at(step)
        np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), want["image"])
        np.testing.assert_array_equal(want["image"], src[reference.global_rows(step)]["image"])
        np.testing.assert_array_equal(want["label"], want["image"][:, 0, 0, 0] % 3)
    for h in halves:
        h.close()


def test_missing_tfds_dataset_says_how_to_build(tmp_path):
    with pytest.raises(DataError) as info:
        load_source({"name": "imagenette", "data_dir": str(tmp_path), "image_size": 0}, "train")
    message = str(info.value)
    assert f"tfds build imagenette --config=320px-v2 --data_dir={tmp_path}" in message
    assert "pip install clrjax[tf]" in message
