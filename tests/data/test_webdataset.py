"""WebDataset tar shards (clrjax/data/webdataset.py) and their stream (clrjax/data/pipeline.py ShardPlan).

The shards are written here: scikit-learn's 8x8 digits rendered to PNG/JPEG/WebP
members with ``.cls`` labels (and ``.txt`` captions), in shards of unequal
sizes, as img2dataset lays them out.
"""
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clrjax import config as config_lib
from clrjax.data import datasets, pipeline, webdataset
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import DataError, dataset_info, load_source

SKIP = r", or set --config.dataset.on_error=skip to leave such input out and count it\.$"
FORMATS = ("png", "jpg", "webp")


def digits(classes=(1, 2, 3), per_class=40):
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    picked = np.concatenate([np.flatnonzero(d.target == c)[:per_class] for c in classes])
    picked = picked[np.random.default_rng(0).permutation(len(picked))]  # shards hold mixed classes
    return images[picked], d.target[picked]


def encode(image, fmt):
    buf = io.BytesIO()
    kwargs = {"quality": 95} if fmt == "jpg" else ({"lossless": True} if fmt == "webp" else {})
    Image.fromarray(image).save(buf, format={"jpg": "JPEG"}.get(fmt, fmt.upper()), **kwargs)
    return buf.getvalue()


def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(root, images, labels, sizes, names=None, formats=FORMATS, prefix="shard"):
    """root/<prefix>-000.tar ... with ``sizes[k]`` samples each: key.<fmt>, key.cls (label or name), key.txt."""
    os.makedirs(root, exist_ok=True)
    assert sum(sizes) == len(images)
    k = 0
    for s, n in enumerate(sizes):
        with tarfile.open(os.path.join(root, f"{prefix}-{s:03d}.tar"), "w") as tar:
            for _ in range(n):
                key = f"{k:06d}"
                add(tar, f"{key}.{formats[k % len(formats)]}", encode(images[k], formats[k % len(formats)]))
                label = str(labels[k]) if names is None else names[labels[k]]
                add(tar, f"{key}.cls", label.encode())
                add(tar, f"{key}.txt", f"the digit {labels[k]}".encode())
                k += 1
    return os.path.join(root, prefix + "-{000..%03d}.tar" % (len(sizes) - 1))


def cfg(path, **kw):
    base = dict(name="webdataset", path=str(path), image_size=0, channels=1, on_error="fail", decode_workers=2,
                decode_processes=0, shuffle_buffer=16, split_fraction=0.0, train_split="train", test_split="test",
                class_names=(), host_crop="center")
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """120 digits (1, 2, 3) in 4 shards of 35, 30, 30 and 25 samples, PNG only (pixel-exact)."""
    images, labels = digits()
    root = str(tmp_path_factory.mktemp("shards"))
    return write_shards(root, images, labels, (35, 30, 30, 25), formats=("png",)), images, labels


# --------------------------------------------------------------------------- layout, labels, random access


def test_patterns_index_labels_and_random_access(shards, tmp_path):
    pattern, images, labels = shards
    assert webdataset.expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert webdataset.expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    root = os.path.dirname(pattern)
    assert (webdataset.expand_shards(pattern) == webdataset.expand_shards(os.path.join(root, "*.tar"))
            == webdataset.expand_shards(root)) and len(webdataset.expand_shards(root)) == 4
    src = load_source(cfg(pattern), "train")
    assert len(src) == 120 and src.shard_sizes.tolist() == [35, 30, 30, 25]
    assert src.num_classes == 4 and src.class_names == () and src.image_shape == (8, 8, 1)  # integer .cls: max + 1
    batch = src[np.arange(120)]
    np.testing.assert_array_equal(batch["image"][..., 0], images)
    np.testing.assert_array_equal(batch["label"], labels)
    assert src.caption(7) == f"the digit {labels[7]}" and src.where(36).endswith("shard-001.tar:000036.png")
    assert dataset_info(cfg(pattern)) == ((8, 8, 1), 4)
    # class names in .cls, mixed formats, resized RGB; {split} shards
    names = {1: "one", 2: "two", 3: "three"}
    write_shards(str(tmp_path), images[:90], labels[:90], (50, 40), names=names, prefix="train")
    write_shards(str(tmp_path), images[90:], labels[90:], (30,), names=names, prefix="test")
    c = cfg(tmp_path / "{split}-*.tar", channels=3, image_size=12)
    train, test = load_source(c, "train"), load_source(c, "test")
    assert train.class_names == ("one", "three", "two") and test.class_names == train.class_names
    assert (len(train), len(test)) == (90, 30) and train[np.arange(3)]["image"].shape == (3, 12, 12, 3)
    np.testing.assert_array_equal(test.labels, [("one", "three", "two").index(names[v]) for v in labels[90:]])
    config = config_lib.load_config_file("configs/simclr.py:webdataset")
    config.dataset.path = str(tmp_path / "{split}-*.tar")
    assert datasets.record_derived_fields(config) == {"class_names": ("one", "three", "two")}
    # split_fraction carves a stratified test split out of one set of shards
    carved = cfg(pattern, split_fraction=0.25)
    a, b = load_source(carved, "train"), load_source(carved, "test")
    assert (len(a), len(b)) == (90, 30) and np.bincount(b.labels).tolist() == [0, 10, 10, 10]


def test_config_validation_of_the_new_fields(shards, tmp_path):
    pattern = shards[0]
    config = config_lib.load_config_file("configs/simclr.py:webdataset")
    for field, value, message in (
            ("path", str(tmp_path / "none-{0..3}.tar"), r"config.dataset.path is '.*none-\{0..3\}.tar', which "
                                                       r"names no existing tar shard"),
            ("shuffle_buffer", 0, r"config.dataset.shuffle_buffer is 0 but must be a positive integer"),
            ("decode_processes", -1, r"config.dataset.decode_processes is -1 but must be a whole number >= 0"),
            ("host_crop", "middle", r"config.dataset.host_crop is 'middle', which is not supported")):
        c = config_lib.apply_overrides(config, {"dataset.path": pattern, f"dataset.{field}": value})
        with pytest.raises(config_lib.ConfigError, match=message):
            config_lib.validate_config(c)


# --------------------------------------------------------------------------- sharding and resume


def _epoch_rows(loaders, epoch):
    spe = loaders[0].steps_per_epoch
    return [np.concatenate([ld.local_rows(s) for s in range(epoch * spe, (epoch + 1) * spe)]) for ld in loaders]


@pytest.mark.parametrize("sizes,processes", [((35, 30, 30, 25), 2),   # unequal shards
                                             ((120,), 2),               # fewer shards than processes
                                             ((35, 30, 29, 25), 3)])    # 119 examples: a remainder
def test_sharding_is_disjoint_complete_and_balanced(sizes, processes):
    batch = 12
    loaders = [TrainLoader(_Counts(sizes), batch, seed=5, process_index=p, process_count=processes, prefetch=0)
               for p in range(processes)]
    n = sum(sizes)
    assert loaders[0].steps_per_epoch == n // batch
    dropped = []
    for epoch in range(3):
        rows = _epoch_rows(loaders, epoch)
        assert all(len(r) == loaders[0].steps_per_epoch * batch // processes for r in rows)  # same count each
        everything = np.concatenate(rows)
        assert len(set(everything.tolist())) == len(everything) == n - n % batch    # disjoint, no repeats
        dropped.append(set(range(n)) - set(everything.tolist()))
        for step in range(epoch * 3, epoch * 3 + 3):  # global_rows = the processes' rows, in process order
            np.testing.assert_array_equal(loaders[0].global_rows(step),
                                          np.concatenate([ld.local_rows(step) for ld in loaders]))
    if n % batch:
        assert dropped[0] != dropped[1]  # the remainder not read moves with the shard order
    else:
        assert dropped == [set()] * 3    # every example once per epoch
    if len(sizes) > 1:
        assert not np.array_equal(loaders[0].plan.shard_order(0), loaders[0].plan.shard_order(1))


class _Counts:
    """A streaming source's counts alone: enough for the plan (local_rows / global_rows)."""

    streaming = True
    shuffle_buffer = 16

    def __init__(self, sizes):
        self.shard_sizes = np.asarray(sizes)

    def __len__(self):
        return int(self.shard_sizes.sum())


def test_stream_in_worker_processes_matches_random_access_and_resumes_exactly(shards):
    pattern = shards[0]
    src = load_source(cfg(pattern, decode_processes=2, shuffle_buffer=20), "train")
    try:
        # batch 12 over 2 processes: 6 rows a step, blocks of 20, so steps cross block boundaries
        with TrainLoader(src, 12, seed=3, process_index=1, process_count=2, prefetch=2) as ld:
            stream = [next(ld) for _ in range(14)]            # 10 steps an epoch: into the second epoch
            assert src.pool().kind == "processes" and len(src.pool().pids) == 2
        reference = TrainLoader(src, 12, seed=3, process_index=1, process_count=2, prefetch=0)
        for step, batch in enumerate(stream):
            rows = reference.local_rows(step)
            np.testing.assert_array_equal(batch["image"], src[rows]["image"])   # = random access by id
            np.testing.assert_array_equal(batch["label"], src.labels[rows])
            np.testing.assert_array_equal(batch["index"], reference.local_counters(step))
        # resume mid-epoch (step 7: block 2, 2 examples into it) and across the epoch boundary
        for start in (7, 10):
            with TrainLoader(src, 12, seed=3, process_index=1, process_count=2, start_step=start, prefetch=2) as ld:
                position = ld.state()
                resumed = [next(ld) for _ in range(14 - start)]
            for a, b in zip(stream[start:], resumed):
                np.testing.assert_array_equal(a["image"], b["image"])
                np.testing.assert_array_equal(a["label"], b["label"])
        assert position == {"step": 10, "epoch": 1, "block": 0, "shard": position["shard"],
                            "offset": position["offset"], "skip": 0, "process_count": 2}
        plan = reference.plan
        assert (position["shard"], position["offset"]) == plan.segments(1, 1, 0, 1)[0][:2]
        with TrainLoader(src, 12, seed=3, process_index=1, process_count=2, start_step=7) as ld:
            assert ld.state()["block"] == 2 and ld.state()["skip"] == 2   # 7 * 6 = 42 = 2 * 20 + 2
        reference.close()
    finally:
        src.close()


def test_host_random_crop_is_deterministic(tmp_path):
    wide = np.zeros((20, 60), np.uint8)
    wide[:, 40:] = 255  # only the right third is white
    path = write_shards(str(tmp_path), np.stack([wide] * 24), np.zeros(24, int), (24,), formats=("png",))
    src = load_source(cfg(path, image_size=10, host_crop="random"), "train")
    with TrainLoader(src, 24, seed=0, prefetch=0) as ld:
        a, b = ld.batch_at(0)["image"], ld.batch_at(0)["image"]
    np.testing.assert_array_equal(a, b)
    means = a.reshape(24, -1).mean(1)
    assert means.min() < 50 and means.max() > 200          # squares cut at different places
    centred = load_source(cfg(path, image_size=10), "train")[np.arange(2)]["image"]
    assert np.allclose(centred.mean(), 0)                   # the centre square [20:40] is black
    offsets = pipeline.crop_offsets(0, np.arange(1000))
    assert 0 <= offsets.min() and offsets.max() < 1 and abs(offsets.mean() - 0.5) < 0.05


# --------------------------------------------------------------------------- bad input: fail (default) or skip and count


def _small(tmp_path, sizes=(10, 10, 10), formats=("png",)):
    images, labels = digits(per_class=10)
    return write_shards(str(tmp_path / "d"), images, labels, sizes, formats=formats), images, labels


def _rewrite_member(path, member, data):
    """Rewrites the shard with one member's bytes replaced (any length; the tar stays well-formed)."""
    with tarfile.open(path) as tar:
        members = [(m.name, data if m.name == member else tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, content in members:
            add(tar, name, content)


def test_corrupt_image_in_a_shard_fails_naming_it_or_is_replaced_and_counted(tmp_path):
    path, _, _ = _small(tmp_path, formats=("png", "jpg"))
    shard1 = os.path.join(os.path.dirname(path), "shard-001.tar")
    _rewrite_member(shard1, "000013.jpg", b"\xff\xd8\xff not a JPEG")
    src = load_source(cfg(path), "train")   # indexing reads headers only: found when decoded
    with pytest.raises(DataError, match=r"^.*/d/shard-001.tar:000013.jpg: cannot be decoded as an image "
                                        r"\(UnidentifiedImageError: .*\); replace the sample in its shard" + SKIP):
        src[np.arange(30)]
    with pytest.raises(DataError, match=r"shard-001.tar:000013.jpg: cannot be decoded"):
        with TrainLoader(src, 30, seed=0) as ld:
            next(ld)
    skip = load_source(cfg(path, on_error="skip"), "train")
    with TrainLoader(skip, 30, seed=0) as ld:
        first = next(ld)
    assert skip.num_skipped == 1 and skip.errors.by_kind == {"decode": 1}
    bad_row = int(np.flatnonzero(ld.local_rows(0) == 13)[0])
    assert first["image"].shape == (30, 8, 8, 1) and first["image"][bad_row].any()  # replaced, not a blank
    again = load_source(cfg(path, on_error="skip"), "train")
    with TrainLoader(again, 30, seed=0) as ld:
        np.testing.assert_array_equal(next(ld)["image"], first["image"])       # the same replacement
    assert again.num_skipped == 1


def test_truncated_image_member(tmp_path):
    path, images, _ = _small(tmp_path, formats=("jpg",))
    shard0 = os.path.join(os.path.dirname(path), "shard-000.tar")
    with tarfile.open(shard0) as tar:
        data = tar.extractfile("000002.jpg").read()
    _rewrite_member(shard0, "000002.jpg", data[: len(data) // 2])
    with pytest.raises(DataError, match=r"shard-000.tar:000002.jpg: cannot be decoded as an image \(OSError: "
                                        r"(image file is truncated|Truncated File Read)"):
        load_source(cfg(path), "train")[np.arange(4)]
    skip = load_source(cfg(path, on_error="skip"), "train")
    assert skip[np.arange(4)]["image"].shape == (4, 8, 8, 1) and skip.num_skipped == 1


def test_shard_cut_short(tmp_path):
    path, _, _ = _small(tmp_path)
    root = os.path.dirname(path)
    shard2 = os.path.join(root, "shard-002.tar")
    with tarfile.open(shard2) as tar:
        info = tar.getmember("000025.png")
    size = os.path.getsize(shard2)
    with open(shard2, "r+b") as f:
        f.truncate(info.offset_data + 10)          # inside sample 25's image (the shard's 6th sample)
    message = (r"^.*/d/shard-002.tar: is cut short: it ends inside member '000025.png' \(10 of its \d+ bytes are "
               r"there\); its first 5 complete samples are read; re-copy or re-create the shard" + SKIP)
    with pytest.raises(DataError, match=message):
        load_source(cfg(path), "train")
    skip = load_source(cfg(path, on_error="skip"), "train")
    assert skip.shard_sizes.tolist() == [10, 10, 5] and skip.errors.by_kind == {"truncated": 1}
    # cut at a member boundary: no end-of-archive blocks
    shard1 = os.path.join(root, "shard-001.tar")
    with tarfile.open(shard1) as tar:
        info = tar.getmember("000015.png")
    with open(shard1, "r+b") as f:
        f.truncate(info.offset)
    with pytest.raises(DataError, match=r"shard-001.tar: is cut short: it ends without the tar end-of-archive "
                                        r"blocks; its first 4 complete samples"):
        load_source(cfg(path), "train")
    skip = load_source(cfg(path, on_error="skip"), "train")
    assert skip.shard_sizes.tolist() == [10, 4, 5] and skip.num_skipped == 2
    with TrainLoader(skip, 6, seed=1, prefetch=2) as ld:   # the rest streams as usual
        assert [next(ld)["image"].shape for _ in range(4)] == [(6, 8, 8, 1)] * 4
    assert size > 0


def test_unreadable_or_not_a_tar_shard_and_sample_without_image(tmp_path):
    path, _, _ = _small(tmp_path)
    root = os.path.dirname(path)
    missing = os.path.join(root, "shard-{000..003}.tar")     # shard-003 does not exist
    with pytest.raises(DataError, match=r"^.*/d/shard-003.tar: cannot be read \(FileNotFoundError: .*\); fix its "
                                        r"permissions or leave it out of --config.dataset.path" + SKIP):
        load_source(cfg(missing), "train")
    skip = load_source(cfg(missing, on_error="skip"), "train")
    assert len(skip) == 30 and skip.errors.by_kind == {"unreadable": 1}
    with open(os.path.join(root, "shard-003.tar"), "wb") as f:
        f.write(b"this is not a tar file" * 100)
    with pytest.raises(DataError, match=r"shard-003.tar: is not a tar file \(ReadError: .*\); re-copy or "
                                        r"re-create the shard" + SKIP):
        load_source(cfg(missing), "train")
    os.remove(os.path.join(root, "shard-003.tar"))
    with tarfile.open(os.path.join(root, "shard-003.tar"), "w") as tar:
        add(tar, "orphan.cls", b"1")
        add(tar, "orphan.txt", b"an image-less sample")
    with pytest.raises(DataError, match=r"shard-003.tar sample 'orphan': has no image \(jpg/jpeg/png/webp/bmp\) "
                                        r"file \(its files: orphan.cls, orphan.txt\)"):
        load_source(cfg(missing), "train")
    assert len(load_source(cfg(missing, on_error="skip"), "train")) == 30
    with pytest.raises(DataError, match=r"shards.tar.gz is a compressed tar file; .* decompress them"):
        webdataset.scan_shard(os.path.join(root, "shards.tar.gz"))
