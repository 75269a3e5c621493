"""Your own images (clrjax/data/folders.py): image folders and CSV/TSV lists written into tmp_path.

The images are scikit-learn's digits rendered to PNG/JPEG/WebP files, so the
labels are real and kNN on them means something.
"""
import json
import os

import numpy as np
import pytest
from PIL import Image

from clrjax import config as config_lib
from clrjax.data import datasets, folders
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import DataError, dataset_info, load_source

CLASSES = ("three", "one", "two")  # sorted: one, three, two


def _digits(n_per_class=20):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    out = {}
    for name, digit in zip(CLASSES, (3, 1, 2)):
        out[name] = images[d.target == digit][:n_per_class]
    return out


def write_folder(root, n_per_class=20, formats=("png", "jpg", "webp"), rgb_every=3):
    """root/<class>/img_XX.<fmt>; every rgb_every-th image RGB, the others grayscale; 8x8 pixels."""
    for name, images in _digits(n_per_class).items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i, image in enumerate(images):
            fmt = formats[i % len(formats)]
            pil = Image.fromarray(image)
            if i % rgb_every == 0:
                pil = pil.convert("RGB")
            kwargs = {"quality": 95} if fmt == "jpg" else ({"lossless": True} if fmt == "webp" else {})
            pil.save(os.path.join(root, name, f"img_{i:02d}.{fmt}"), **kwargs)
    return root


def cfg(path, **kw):
    base = dict(name="image_folder", path=str(path), image_size=0, channels=1, on_error="fail",
                decode_workers=2, split_fraction=0.0, train_split="train", test_split="test", class_names=())
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(str(tmp_path_factory.mktemp("digits_folder")))


# --------------------------------------------------------------------------- image_folder


def test_labels_from_sorted_folders_ordering_and_decoding(folder):
    src = load_source(cfg(folder), "train")
    assert len(src) == 60 and src.num_classes == 3 and src.image_shape == (8, 8, 1)
    assert src.class_names == ("one", "three", "two")
    # sorted (class, relative path): the first 20 are one/img_00.png, one/img_01.jpg, ...
    assert [os.path.relpath(p, folder) for p in src.paths[:3]] == ["one/img_00.png", "one/img_01.jpg",
                                                                   "one/img_02.webp"]
    batch = src[np.arange(60)]
    assert batch["image"].shape == (60, 8, 8, 1) and batch["image"].dtype == np.uint8
    np.testing.assert_array_equal(batch["label"], np.repeat([0, 1, 2], 20))
    # PNG and lossless WebP are exact; JPEG close; the digit "one" matches the sklearn pixels
    expected = _digits()["one"]
    np.testing.assert_array_equal(batch["image"][0, ..., 0], expected[0])
    np.testing.assert_array_equal(batch["image"][2, ..., 0], expected[2])
    assert np.abs(batch["image"][1, ..., 0].astype(int) - expected[1]).mean() < 20
    # deterministic: a fresh source gives identical bytes; a single index has no batch axis
    np.testing.assert_array_equal(load_source(cfg(folder), "train")[np.arange(60)]["image"], batch["image"])
    assert src[5]["image"].shape == (8, 8, 1)
    assert dataset_info(cfg(folder)) == ((8, 8, 1), 3)


def test_rgb_conversion_and_resize_crop(folder, tmp_path):
    src = load_source(cfg(folder, channels=3, image_size=16), "train")
    image = src[np.arange(3)]["image"]
    assert image.shape == (3, 16, 16, 3) and src.image_shape == (16, 16, 3)
    np.testing.assert_array_equal(image[0, ..., 0], image[0, ..., 1])  # gray -> RGB copies the channel
    # a 60x30 image: the centred 30x30 square, resized
    wide = np.zeros((30, 60, 3), np.uint8)
    wide[:, 15:45] = 200
    os.makedirs(tmp_path / "wide" / "a")
    Image.fromarray(wide).save(tmp_path / "wide" / "a" / "x.png")
    out = load_source(cfg(tmp_path / "wide", channels=3, image_size=10), "train")[0]["image"]
    assert out.shape == (10, 10, 3) and out.min() == 200


def test_variable_sizes_need_image_size(tmp_path):
    os.makedirs(tmp_path / "a")
    Image.new("RGB", (32, 32)).save(tmp_path / "a" / "small.png")
    Image.new("RGB", (50, 37)).save(tmp_path / "a" / "big.jpg")
    with pytest.raises(DataError, match=r"a/small.png is 32x32 but .*a/big.jpg is 50x37, and "
                                        r"config.dataset.image_size is 0 \(keep the native size\); set "
                                        r"--config.dataset.image_size"):
        load_source(cfg(tmp_path, channels=3), "train")
    assert load_source(cfg(tmp_path, channels=3, image_size=24), "train")[np.arange(2)]["image"].shape == (2, 24, 24, 3)


def test_split_fraction_is_stratified_deterministic_disjoint_and_complete(folder):
    c = cfg(folder, split_fraction=0.25)
    train, test = load_source(c, "train"), load_source(c, "test")
    assert (len(train), len(test)) == (45, 15)
    assert set(train.paths).isdisjoint(test.paths) and len(set(train.paths) | set(test.paths)) == 60
    assert np.bincount(test.labels).tolist() == [5, 5, 5] and test.class_names == train.class_names
    assert load_source(c, "test").paths == test.paths
    with pytest.raises(DataError, match=r"has no 'test' sub-folder and config.dataset.split_fraction is 0"):
        load_source(cfg(folder), "test")


def test_split_sub_roots_and_split_placeholder(tmp_path):
    write_folder(str(tmp_path / "train"), n_per_class=6)
    write_folder(str(tmp_path / "test"), n_per_class=3)
    train, test = load_source(cfg(tmp_path), "train"), load_source(cfg(tmp_path), "test")
    assert (len(train), len(test)) == (18, 9) and test.class_names == ("one", "three", "two")
    np.testing.assert_array_equal(test.labels, np.repeat([0, 1, 2], 3))
    same = load_source(cfg(str(tmp_path / "{split}")), "test")
    assert same.paths == test.paths


def test_flat_folder_is_unlabelled(tmp_path):
    for i in range(5):
        Image.new("L", (8, 8), color=i * 10).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    src = load_source(cfg(tmp_path), "train")
    assert len(src) == 5 and src.num_classes == 1 and not src.labelled and src.labels.tolist() == [0] * 5
    with pytest.raises(DataError, match=r"is unlabelled \(no class sub-folders\), so split 'test' cannot "
                                        r"evaluate an encoder"):
        load_source(cfg(tmp_path, split_fraction=0.2), "test")


def test_class_names_recorded_and_given_order(folder):
    config = config_lib.load_config_file("configs/simclr.py:image_folder")
    config.dataset.path = folder
    assert datasets.record_derived_fields(config) == {"class_names": ("one", "three", "two")}
    assert tuple(config.dataset.class_names) == ("one", "three", "two")
    assert datasets.record_derived_fields(config) == {}  # already set: kept
    src = load_source(cfg(folder, class_names=("two", "one", "three")), "train")
    assert src.class_names == ("two", "one", "three") and src.labels[0] == 1  # 'one' is label 1 now


def test_sharding_over_two_processes_is_disjoint_and_complete(folder):
    src = load_source(cfg(folder), "train")
    loaders = [TrainLoader(src, 12, seed=3, process_index=p, process_count=2, prefetch=0) for p in range(2)]
    seen = []
    for step in range(loaders[0].steps_per_epoch):  # one epoch: 60 // 12 = 5 steps
        rows = [ld.local_rows(step) for ld in loaders]
        assert len(rows[0]) == len(rows[1]) == 6 and set(rows[0]).isdisjoint(rows[1])
        seen += [*rows[0], *rows[1]]
        batches = [ld.batch_at(step) for ld in loaders]
        np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]),
                                      src[loaders[0].global_rows(step)]["image"])
    assert sorted(seen) == list(range(60))
    # the threaded, prefetching reader gives the same stream; resuming at a step continues it exactly
    with TrainLoader(src, 12, seed=3, process_index=1, process_count=2, prefetch=2) as ld:
        stream = [next(ld) for _ in range(7)]
    with TrainLoader(src, 12, seed=3, process_index=1, process_count=2, start_step=4, prefetch=2) as ld:
        resumed = [next(ld) for _ in range(3)]
    for a, b in zip(stream[4:], resumed):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(stream[6]["image"], loaders[1].batch_at(6)["image"])


# --------------------------------------------------------------------------- csv / tsv


def test_csv_relative_and_absolute_paths_string_labels_and_captions(folder, tmp_path):
    src_folder = load_source(cfg(folder), "train")
    lines = ["path,label,caption"]
    for i, (p, label) in enumerate(zip(src_folder.paths, src_folder.labels)):
        path = p if i % 2 else os.path.relpath(p, tmp_path)
        lines.append(f'{path},{src_folder.class_names[label]},"digit {label}, number {i}"')
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    src = load_source(cfg(tmp_path / "list.csv", name="csv"), "train")
    assert src.paths == src_folder.paths and src.class_names == src_folder.class_names
    np.testing.assert_array_equal(src.labels, src_folder.labels)
    assert src.captions[3] == "digit 0, number 3"
    np.testing.assert_array_equal(src[np.arange(10)]["image"], src_folder[np.arange(10)]["image"])
    # TSV with integer labels: used as they are
    rows = ["path\tlabel"] + [f"{p}\t{7 if i < 30 else 2}" for i, p in enumerate(src_folder.paths)]
    (tmp_path / "list.tsv").write_text("\n".join(rows) + "\n")
    tsv = load_source(cfg(tmp_path / "list.tsv", name="tsv", split_fraction=0.5), "test")
    assert tsv.num_classes == 8 and sorted(set(tsv.labels.tolist())) == [2, 7] and tsv.class_names == ()
    # no label column: unlabelled
    (tmp_path / "plain.csv").write_text("path\n" + "\n".join(src_folder.paths[:4]) + "\n")
    plain = load_source(cfg(tmp_path / "plain.csv", name="csv"), "train")
    assert len(plain) == 4 and plain.num_classes == 1 and plain.captions is None


def test_csv_without_path_column(tmp_path):
    (tmp_path / "bad.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataError, match=r"bad.csv: the header row names the columns \['file', 'label'\] but no "
                                        r"'path' column"):
        load_source(cfg(tmp_path / "bad.csv", name="csv"), "train")


# --------------------------------------------------------------------------- config validation


def test_config_fields_are_validated_before_loading(tmp_path):
    config = config_lib.load_config_file("configs/simclr.py:image_folder")
    for field, value, message in (
            ("path", "", r"config.dataset.path is empty but image_folder reads its images from it; set "
                         r"--config.dataset.path to the image folder."),
            ("path", str(tmp_path / "nope"), r"config.dataset.path is '.*nope', which does not exist"),
            ("on_error", "ignore", r"config.dataset.on_error is 'ignore', which is not supported; use one of "
                                   r"fail, skip"),
            ("split_fraction", 1.0, r"config.dataset.split_fraction is 1.0 but must be in \[0, 1\)"),
            ("decode_workers", 0, r"config.dataset.decode_workers is 0 but must be a positive integer"),
            ("channels", 4, r"config.dataset.channels is 4 but image_folder converts images to 1 or 3 channels")):
        c = config_lib.apply_overrides(config, {"dataset.path": str(tmp_path), f"dataset.{field}": value})
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate_config(c)


# --------------------------------------------------------------------------- bad input: fail (default) or skip and count

SKIP = r", or set --config.dataset.on_error=skip to leave such input out and count it\.$"


def _copy(folder, dst, n_per_class=4):
    write_folder(str(dst), n_per_class=n_per_class)
    return dst


def test_corrupt_image_fails_naming_it_or_is_replaced_and_counted(tmp_path):
    root = _copy(None, tmp_path / "d")
    (root / "one" / "img_01.jpg").write_bytes(b"this is not a JPEG")
    message = (r"^.*/d/one/img_01.jpg: cannot be decoded as an image \(UnidentifiedImageError: cannot identify "
               r"image file .*\); replace or delete the file" + SKIP)
    with pytest.raises(DataError, match=message):          # image_size 0: found reading the headers at load
        load_source(cfg(root), "train")
    src = load_source(cfg(root, image_size=8), "train")   # image_size > 0: found when decoded
    with pytest.raises(DataError, match=message):
        src[np.arange(4)]
    skip = load_source(cfg(root, image_size=8, on_error="skip"), "train")
    batch = skip[np.arange(12)]
    assert skip.num_skipped == 1 and skip.errors.by_kind == {"decode": 1}
    np.testing.assert_array_equal(batch["image"][1], batch["image"][2])  # replaced by the next example
    assert skip.errors.summary()["first_files"][0]["path"].endswith("one/img_01.jpg")
    skip[np.arange(12)]
    assert skip.num_skipped == 1                          # counted once, not per read


def test_truncated_jpeg(tmp_path):
    root = tmp_path / "d"
    os.makedirs(root / "a")
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / "a" / f"{i}.jpg", quality=90)
    data = (root / "a" / "1.jpg").read_bytes()
    (root / "a" / "1.jpg").write_bytes(data[: len(data) // 2])
    src = load_source(cfg(root, image_size=32, channels=3), "train")
    with pytest.raises(DataError, match=r"^.*/a/1.jpg: cannot be decoded as an image \(OSError: image file is "
                                        r"truncated.*\); replace or delete the file" + SKIP):
        src[np.arange(3)]
    skip = load_source(cfg(root, image_size=32, channels=3, on_error="skip"), "train")
    assert skip[np.arange(3)]["image"].shape == (3, 32, 32, 3) and skip.num_skipped == 1


def test_unreadable_file(tmp_path):
    root = _copy(None, tmp_path / "d")
    os.symlink(tmp_path / "gone.png", root / "two" / "img_99.png")  # a dangling link: listed but unreadable
    with pytest.raises(DataError, match=r"^.*/d/two/img_99.png: cannot be read \(missing target or no read "
                                        r"permission\); fix or delete the file" + SKIP):
        load_source(cfg(root), "train")
    skip = load_source(cfg(root, on_error="skip"), "train")
    assert len(skip) == 12 and skip.num_skipped == 1 and skip.errors.by_kind == {"unreadable": 1}


def test_missing_path_in_csv(tmp_path):
    root = _copy(None, tmp_path / "d")
    (tmp_path / "list.csv").write_text("path,label\nd/one/img_00.png,one\nd/one/nope.png,one\nd/two/img_00.png,two\n")
    with pytest.raises(DataError, match=r"^.*/list.csv line 3: names 'd/one/nope.png', and .*/d/one/nope.png does "
                                        r"not exist; fix the path \(relative paths are relative to the list "
                                        r"file\)" + SKIP):
        load_source(cfg(tmp_path / "list.csv", name="csv"), "train")
    skip = load_source(cfg(tmp_path / "list.csv", name="csv", on_error="skip"), "train")
    assert len(skip) == 2 and skip.num_skipped == 1 and skip.errors.by_kind == {"missing_path": 1}
    assert skip.class_names == ("one", "two")


def test_empty_class_folder(tmp_path):
    root = _copy(None, tmp_path / "d")
    os.makedirs(root / "zero")
    (root / "zero" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"^.*/d/zero: is an empty class folder \(no jpg/jpeg/png/webp/bmp files\); "
                                        r"add images or remove the folder" + SKIP):
        load_source(cfg(root), "train")
    skip = load_source(cfg(root, on_error="skip"), "train")
    assert skip.class_names == ("one", "three", "two") and skip.num_skipped == 1


def test_class_in_train_but_not_in_test_and_the_reverse(tmp_path):
    write_folder(str(tmp_path / "train"), n_per_class=4)
    write_folder(str(tmp_path / "test"), n_per_class=2)
    os.rename(tmp_path / "test" / "two", tmp_path / "test" / "four")
    missing = (r"^.*/test class 'two': has images in the training split but none in split 'test'; add images of "
               r"that class to the evaluation split" + SKIP)
    with pytest.raises(DataError, match=missing):   # already when the training split is loaded
        load_source(cfg(tmp_path), "train")
    with pytest.raises(DataError, match=missing):
        load_source(cfg(tmp_path), "test")
    test = load_source(cfg(tmp_path, on_error="skip"), "test")
    assert len(test) == 4 and test.errors.by_kind == {"missing_class": 1, "unknown_class": 1}
    assert "holds 2 images but is not a class of the training split" in test.errors.files[1][1]
    assert load_source(cfg(tmp_path, on_error="skip"), "train").num_skipped == 0
