"""The grain reader of TFDS array_record sources yields exactly the direct reader's batches.

Same contract as tests/data/test_pipeline.py (images, labels, index per step,
per-process rows, resume from a step), checked on locally built array_record
datasets (no network, no TensorFlow): PNG-encoded ``Image`` features, fixed
size and variable size (host resize), as ``tfds.data_source`` serves them.

Run as a script for the host throughput benchmark (direct vs grain reader):
``.venv/bin/python -m tests.data.test_grain_reader [--size 32 --num 4096 --batch 256 --steps 30]``.
"""
import argparse
import collections
import io
import threading
import time

import numpy as np
import pytest

from clrjax.data import grain_reader
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import TfdsSource

KEYS = ("image", "label", "index")


def _png(array):
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()  # encoded bytes: the Image feature then needs no TensorFlow


def _image(rng, i, shape):
    """Smooth random image (compresses like a photo, unlike noise); pixel [0, 0, 0] = i % 256."""
    h, w, _ = shape
    coarse = rng.integers(0, 256, size=(max(2, h // 8), max(2, w // 8), 3)).astype(np.float32)
    ys = np.linspace(0, coarse.shape[0] - 1, h).astype(int)
    xs = np.linspace(0, coarse.shape[1] - 1, w).astype(int)
    image = coarse[ys][:, xs].astype(np.uint8)
    image[0, 0, 0] = i % 256  # identifies the example (up to 256) in fixed-size checks
    return image


def build_image_dataset(data_dir, name, num, shape, num_classes=10, variable=False):
    """Builds an array_record TFDS dataset ``name`` of ``num`` PNG images into ``data_dir``.

    ``shape`` (H, W, 3) is the image size, or the largest one when ``variable``
    (then sizes vary in [H/2, H] x [W/2, W] and the feature shape is (None, None, 3)).
    """
    import tensorflow_datasets as tfds

    class_name = "".join(part.capitalize() for part in name.split("_"))

    def info(self):
        feature_shape = (None, None, 3) if variable else tuple(shape)
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=feature_shape),
            "label": tfds.features.ClassLabel(num_classes=num_classes)}))

    def split_generators(self, dl_manager):
        return {"train": self._generate_examples(num)}

    def generate(self, n):
        rng = np.random.default_rng(0)
        for i in range(n):
            if variable:
                size = (int(rng.integers(shape[0] // 2, shape[0] + 1)), int(rng.integers(shape[1] // 2, shape[1] + 1)), 3)
                image = np.full(size, (7 * i) % 256, np.uint8)  # constant: survives resizing
            else:
                image = _image(rng, i, shape)
            yield i, {"image": _png(image), "label": i % num_classes}

    builder_cls = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
        "VERSION": tfds.core.Version("1.0.0"), "_info": info, "_split_generators": split_generators,
        "_generate_examples": generate,
        "__module__": __name__})
    config = tfds.download.DownloadConfig(try_download_gcs=False)
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare(download_config=config)
    return builder_cls.name


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds_grain")
    build_image_dataset(data_dir, "clrjax_grain_fixed", 40, (8, 8, 3), num_classes=7)
    build_image_dataset(data_dir, "clrjax_grain_variable", 24, (20, 20, 3), num_classes=5, variable=True)
    return str(data_dir)


def take(loader, n):
    with loader:
        return [next(loader) for _ in range(n)]


def assert_same(a, b):
    for k in KEYS:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_auto_reader_picks_grain_for_tfds_only(tfds_dir):
    from clrjax.data.sources import ArraySource

    src = TfdsSource("clrjax_grain_fixed", "train", tfds_dir)
    assert TrainLoader(src, 8, seed=0).reader == "grain"
    assert TrainLoader(src, 8, seed=0, reader="direct").reader == "direct"
    memory = ArraySource(np.zeros((16, 2, 2, 1), np.uint8), np.zeros(16))
    assert TrainLoader(memory, 8, seed=0).reader == "direct"
    with pytest.raises(ValueError, match="reader must be"):
        TrainLoader(memory, 8, seed=0, reader="tf.data")


@pytest.mark.parametrize("processes,prefetch,chunk", [(1, 0, 32), (1, 2, 5), (2, 0, 3), (2, 2, 32)])
def test_grain_batches_equal_direct_batches(tfds_dir, processes, prefetch, chunk):
    src = TfdsSource("clrjax_grain_fixed", "train", tfds_dir)
    reference = TrainLoader(src, 16, seed=5, reader="direct", prefetch=0)
    # 40 // 16 = 2 steps per epoch: 5 steps cross two epoch boundaries; chunk < 16/P splits a
    # step's rows into several grain read units (unevenly: 16 rows in chunks of 5 -> 4 parts)
    streams = [take(TrainLoader(src, 16, seed=5, process_index=p, process_count=processes, prefetch=prefetch,
                                reader="grain", read_threads=3, read_chunk=chunk), 5) for p in range(processes)]
    for step in range(5):
        want = reference.batch_at(step)
        for p in range(processes):
            # each process's grain batch is the direct reader's batch of that process ...
            direct = TrainLoader(src, 16, seed=5, process_index=p, process_count=processes, reader="direct")
            assert_same(streams[p][step], direct.batch_at(step))
            assert len(streams[p][step]["image"]) == 16 // processes
        # ... and the shards concatenate to the global batch
        got = {k: np.concatenate([streams[p][step][k] for p in range(processes)]) for k in KEYS}
        assert_same(got, want)
        # TFDS stores records in hashed-key order; example key i has pixel i and label i % 7
        np.testing.assert_array_equal(want["label"], want["image"][:, 0, 0, 0] % 7)


def test_grain_process_shard_reads_only_its_rows(tfds_dir):
    """Process 1 of 2 asks grain's source for exactly its half of each global batch, in order."""
    src = TfdsSource("clrjax_grain_fixed", "train", tfds_dir)
    read = []

    class Recording:
        def __init__(self, ds):
            self._ds = ds

        def __len__(self):
            return len(self._ds)

        def __getitem__(self, i):
            read.append(int(i))
            return self._ds[i]

    class RecordingSource(TfdsSource):
        @property
        def data_source(self):
            return recording

    recording = Recording(src.data_source)
    shard = RecordingSource("clrjax_grain_fixed", "train", tfds_dir)
    loader = TrainLoader(shard, 16, seed=1, process_index=1, process_count=2, prefetch=0,
                         read_threads=2, read_ahead=8, read_chunk=3)
    assert loader.reader == "grain"
    batches = take(loader, 3)
    want = np.concatenate([loader.global_rows(s)[8:16] for s in range(3)])
    # every row of the shard was read (threads may finish out of order), and nothing outside the
    # shard: read-ahead only touches this process's rows of the next steps
    assert collections.Counter(want.tolist()) <= collections.Counter(read)
    assert set(read) <= set(np.concatenate([loader.global_rows(s)[8:16] for s in range(5)]).tolist())
    direct = TrainLoader(src, 16, seed=1, process_index=1, process_count=2, reader="direct")
    for step, batch in enumerate(batches):
        assert_same(batch, direct.batch_at(step))


_SHARD_SCRIPT = """
import sys
import numpy as np
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import TfdsSource
data_dir, p, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
loader = TrainLoader(TfdsSource("clrjax_grain_fixed", "train", data_dir), 16, seed=9, process_index=p,
                     process_count=2, start_step=1, read_chunk=3)
assert loader.reader == "grain"
with loader:
    batches = [next(loader) for _ in range(4)]
np.savez(out, **{f"{k}{s}": b[k] for s, b in enumerate(batches) for k in ("image", "label", "index")})
"""


def test_two_os_processes_read_disjoint_shards_of_each_global_batch(tfds_dir, tmp_path):
    """Two real processes (p = 0, 1 of 2), each with its own grain pipeline, resumed at step 1."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    outs = [str(tmp_path / f"shard{p}.npz") for p in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _SHARD_SCRIPT, tfds_dir, str(p), outs[p]], env=env,
                              stderr=subprocess.PIPE, text=True) for p in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
    shards = [np.load(out) for out in outs]
    reference = TrainLoader(TfdsSource("clrjax_grain_fixed", "train", tfds_dir), 16, seed=9, reader="direct")
    for s in range(4):
        want = reference.batch_at(1 + s)
        got = {k: np.concatenate([shards[p][f"{k}{s}"] for p in range(2)]) for k in KEYS}
        assert_same(got, want)
        ids = [set(shards[p][f"image{s}"][:, 0, 0, 0].tolist()) for p in range(2)]
        assert not ids[0] & ids[1] and len(ids[0]) == len(ids[1]) == 8  # disjoint halves


@pytest.mark.parametrize("prefetch", [0, 2])
def test_grain_resume_from_step_gives_identical_stream(tfds_dir, prefetch):
    src = TfdsSource("clrjax_grain_variable", "train", tfds_dir, image_size=12)
    first = TrainLoader(src, 8, seed=3, process_index=1, process_count=2, prefetch=prefetch, read_threads=2,
                        read_chunk=3)
    with first:
        for _ in range(4):
            next(first)
        state = first.state()
        rest = [next(first) for _ in range(5)]  # 24 // 8 = 3 steps per epoch: crosses into epoch 3
    assert state == {"step": 4}  # the step alone is the position
    resumed = TrainLoader(src, 8, seed=3, process_index=1, process_count=2, start_step=state["step"],
                          prefetch=prefetch, read_threads=2, read_chunk=2)
    again = take(resumed, 5)
    direct = TrainLoader(src, 8, seed=3, process_index=1, process_count=2, reader="direct")
    for offset, (x, y) in enumerate(zip(rest, again)):
        assert_same(x, y)
        assert_same(x, direct.batch_at(4 + offset))
    assert again[0]["image"].shape == (4, 12, 12, 3)
    # variable-size images were decoded and resized; constant images stay constant (value 7*i)
    assert np.all(again[0]["image"] == again[0]["image"][:, :1, :1, :1])


def test_grain_read_error_is_raised_and_close_stops_threads(tfds_dir):
    class Broken(TfdsSource):
        def decode(self, example):
            raise OSError("corrupt record")

    loader = TrainLoader(Broken("clrjax_grain_fixed", "train", tfds_dir), 8, seed=0, prefetch=2, read_threads=2)
    with pytest.raises(OSError, match="corrupt record"):
        next(loader)
    loader.close()
    loader = TrainLoader(TfdsSource("clrjax_grain_fixed", "train", tfds_dir), 8, seed=0, prefetch=2)
    next(loader)
    loader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("grain-thread-prefetch")]
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


def test_grain_reader_on_in_memory_source_matches_direct():
    from clrjax.data.sources import ArraySource

    images = (np.arange(50)[:, None, None, None] * np.ones((1, 3, 3, 1))).astype(np.uint8)
    src = ArraySource(images, np.arange(50) % 7)
    assert not grain_reader.has_record_source(src)
    got = take(TrainLoader(src, 10, seed=2, process_index=0, process_count=2, reader="grain", read_threads=2,
                           read_chunk=2), 7)
    direct = TrainLoader(src, 10, seed=2, process_index=0, process_count=2, reader="direct")
    for step, batch in enumerate(got):
        assert_same(batch, direct.batch_at(step))


# --------------------------------------------------------------------------- benchmark


def _bench(src, reader, batch, steps, prefetch, warmup=3):
    """-> (images/s wall, images per CPU-second of this process); the second is robust to shared cores."""
    loader = TrainLoader(src, batch, seed=0, reader=reader, prefetch=prefetch)
    with loader:
        for _ in range(warmup):
            next(loader)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            next(loader)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return steps * batch / wall, steps * batch / cpu


def main():
    import tempfile

    parser = argparse.ArgumentParser(description="host images/s of the TFDS readers: direct vs grain")
    parser.add_argument("--size", type=int, nargs="+", default=[32, 160])
    parser.add_argument("--num", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prefetch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as data_dir:
        for size in args.size:
            name = f"clrjax_bench{size}"
            t = time.perf_counter()
            build_image_dataset(data_dir, name, args.num, (size, size, 3))
            print(f"built {args.num} PNG images {size}x{size}x3 in {time.perf_counter() - t:.1f} s")
            src = TfdsSource(name, "train", data_dir)
            results = {"direct": [], "grain": []}
            for _ in range(args.repeats):  # interleaved, so that load from other processes hits both
                for reader in results:
                    results[reader].append(_bench(src, reader, args.batch, args.steps, args.prefetch))
            for reader, runs in results.items():
                wall, cpu = np.array(runs).T
                print(f"  {size}x{size}x3 batch {args.batch} prefetch {args.prefetch} {reader:6s}: "
                      f"{np.median(wall):7.0f} images/s wall (median of {len(runs)}: "
                      f"{' '.join(f'{w:.0f}' for w in wall)}), {np.median(cpu):7.0f} images/CPU-s")


if __name__ == "__main__":
    main()
