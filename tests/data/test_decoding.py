"""Host decoding (clrjax/data/decoding.py): worker processes against threads, a dying worker, and the
image_folder source decoding in worker processes (bad input included) and cutting random host crops."""
import io
import os
import signal

import numpy as np
import pytest
from PIL import Image

from clrjax.data import decoding
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import DataError, load_source
from tests.data.test_folders import cfg, write_folder


def _encoded(n=6):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30, 50, 3), dtype=np.uint8)).save(buf, format="JPEG" if i % 2 else "PNG")
        out.append(buf.getvalue())
    return out + [b"not an image"]


def test_worker_processes_decode_as_threads_and_a_dead_worker_is_reported():
    items = _encoded()
    pool = decoding.ProcessDecodePool(2)
    try:
        futures = [pool.submit(items, 16, 3, None, [0.0] * len(items)) for _ in range(3)]
        out, failures = futures[-1].result(timeout=60)
        expected, expected_failures = decoding.ThreadDecodePool(1).submit(items, 16, 3, None,
                                                                         [0.0] * len(items)).result()
        np.testing.assert_array_equal(out, expected)
        assert out.shape == (7, 16, 16, 3) and failures == expected_failures
        assert failures[0][:2] == (6, "decode") and "cannot identify image file (its bytes)" in failures[0][2]
        victim = pool.pids[0]
        os.kill(victim, signal.SIGKILL)
        errors = []
        for _ in range(4):  # the pool sends to the least busy worker: one of these lands on the dead one
            try:
                pool.submit(items, 16, 3, None).result(timeout=60)
            except decoding.DecodeWorkerError as err:
                errors.append(str(err))
        assert errors and f"decode worker process {victim} exited with status -9" in errors[0]
    finally:
        pool.close()


def test_image_folder_in_worker_processes_with_bad_input_and_random_host_crop(tmp_path):
    root = write_folder(str(tmp_path / "d"), n_per_class=6)
    threads = load_source(cfg(root, image_size=8), "train")
    procs = load_source(cfg(root, image_size=8, decode_processes=2), "train")
    try:
        np.testing.assert_array_equal(procs[np.arange(18)]["image"], threads[np.arange(18)]["image"])
        with open(os.path.join(root, "two", "img_02.webp"), "wb") as f:
            f.write(b"RIFF broken")
        with pytest.raises(DataError, match=r"two/img_02.webp: cannot be decoded as an image"):
            procs[np.arange(18)]
        with pytest.raises(DataError, match=r"two/img_02.webp: cannot be decoded as an image"):
            procs[np.arange(18)]  # fail stays fail on a second read
    finally:
        procs.close()
    skip = load_source(cfg(root, image_size=8, decode_processes=2, on_error="skip"), "train")
    try:
        batch = skip[np.arange(18)]
        np.testing.assert_array_equal(batch["image"][14], batch["image"][15])  # replaced by the next image
        assert skip.num_skipped == 1 and batch["label"][14] == 2
    finally:
        skip.close()
    wide = tmp_path / "wide" / "a"
    os.makedirs(wide)
    for i in range(8):
        image = np.zeros((10, 40), np.uint8)
        image[:, 30:] = 255
        Image.fromarray(image).save(wide / f"{i}.png")
    crop = load_source(cfg(tmp_path / "wide", image_size=10, host_crop="random"), "train")
    with TrainLoader(crop, 8, seed=1, prefetch=0) as ld:
        means = ld.batch_at(0)["image"].reshape(8, -1).mean(1)
    assert means.min() < 50 and means.max() > 100  # squares cut at different places (deterministic: seed 1)
    assert crop[np.arange(8)]["image"].max() == 0  # source[indices] (evaluation) cuts the centre
