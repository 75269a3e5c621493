"""Host decode speed: which JPEG decoder, and images/s per core through the webdataset loader.

Two parts, both on synthetic images (smooth scenes with sensor-like noise,
JPEG quality 90: a JPEG of pure noise would decode slower than a photograph):

``decoders`` -- one thread, one image at a time, 500x375 JPEG -> centred
375x375 square -> 224x224 RGB (the ImageNet case, what
``dataset.image_size=224`` asks for), for every decoder that imports:
Pillow (with ``draft``), clrjax's ``decode_image``, simplejpeg, PyTurboJPEG,
OpenCV (one thread); run the same command with a Pillow-SIMD interpreter for
Pillow-SIMD. The figure is CPU time of the process (best of the repeats,
decoders interleaved): what one core spends per image, which load from other
jobs changes much less than wall time. Needs only numpy and the decoders, not
clrjax's dependencies::

    python benchmarks/decode_bench.py decoders [--images 200] [--repeats 5]

``pipeline`` -- the training input path of a ``webdataset`` source:
``TrainLoader`` over tar shards written to a temporary folder, decoding in
``dataset.decode_processes`` worker processes (1, 2, ..., all cores), images/s
of the loader alone (median over timed batches after warm-up batches), for
500x375 JPEG -> 224 and 32x32 PNG (native size); writes ``--json_out`` with
the environment (``clrjax.benchmarking.environment``)::

    .venv/bin/python benchmarks/decode_bench.py pipeline [--workers 1,2,all] [--json_out decode_bench.json]

Per-core figures are images/s divided by the worker count; they hold only
while every worker has a core of its own (the report says how loaded the
machine was: ``os.getloadavg()`` before each case).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JPEG_SIZE = (500, 375)
TARGET = 224


def scene(rng, w, h):
    """A smooth random scene with noise: compresses and decodes like a photograph, not like noise."""
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def encoded(kind: str, n: int, seed: int = 0):
    """n encoded images (bytes): 'jpeg' 500x375 quality 90, or 'png' 32x32."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        if kind == "jpeg":
            scene(rng, *JPEG_SIZE).save(buf, format="JPEG", quality=90)
        else:
            scene(rng, 32, 32).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------------- decoders


def _square(w, h):
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, side


def _pillow_resize(array):
    h, w = array.shape[:2]
    left, top, side = _square(w, h)
    image = Image.fromarray(array).crop((left, top, left + side, top + side))
    return np.asarray(image.resize((TARGET, TARGET), Image.BILINEAR, reducing_gap=None))


def _decoders():
    """name -> (decode only: bytes -> array, decode + centre square + resize to 224: bytes -> array)."""
    found = {}
    import PIL

    pillow_name = "Pillow-SIMD" if "post" in PIL.__version__ or ".simd" in PIL.__version__ else "Pillow"
    sys.path.insert(0, ROOT)
    try:
        from clrjax.data.decoding import decode_image  # the code the loader runs
    except ImportError:  # a Pillow-SIMD interpreter without clrjax's dependencies: the same steps
        decode_image = None

    def pil_decode(data):
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("RGB"))

    def pil_full(data):  # clrjax's Pillow path: draft (1/2, 1/4, 1/8 only), convert, centre square, resize
        with Image.open(io.BytesIO(data)) as image:
            w, h = image.size
            shorter = min(w, h)
            image.draft("RGB", (-(-w * TARGET // shorter), -(-h * TARGET // shorter)))
            return _pillow_resize(np.asarray(image.convert("RGB")))

    found[f"{pillow_name} {PIL.__version__}"] = (pil_decode, pil_full)
    if decode_image is not None:
        from clrjax.data.decoding import jpeg_decoder
        found[f"clrjax decode_image ({jpeg_decoder()})"] = (None, lambda d: decode_image(d, TARGET, 3))
    try:
        import simplejpeg

        def sj(data, fast=False):
            return simplejpeg.decode_jpeg(data, colorspace="RGB", fastdct=fast, fastupsample=fast,
                                          min_height=TARGET, min_width=TARGET)
        found[f"simplejpeg {simplejpeg.__version__} + Pillow resize"] = (sj, lambda d: _pillow_resize(sj(d)))
        found[f"simplejpeg {simplejpeg.__version__} fastdct/fastupsample + Pillow resize"] = (
            lambda d: sj(d, True), lambda d: _pillow_resize(sj(d, True)))
    except ImportError:
        pass
    try:
        import cv2

        cv2.setNumThreads(1)  # one core, as the others

        def cv_decode(data):
            return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)

        def cv_full(data):
            array = cv_decode(data)
            h, w = array.shape[:2]
            left, top, side = _square(w, h)
            return cv2.resize(array[top:top + side, left:left + side], (TARGET, TARGET), interpolation=cv2.INTER_AREA)
        found[f"OpenCV {cv2.__version__} (INTER_AREA)"] = (cv_decode, cv_full)
    except (ImportError, AttributeError):
        pass
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()

        def tj_decode(data):
            return tj.decode(data, pixel_format=turbojpeg.TJPF_RGB)
        found[f"PyTurboJPEG {getattr(turbojpeg, '__version__', '')} + Pillow resize"] = (
            tj_decode, lambda d: _pillow_resize(tj_decode(d)))
    except (ImportError, OSError, RuntimeError):
        pass
    return found


def _cpu_time(fn, items):
    """CPU seconds of this process for fn over items (one thread: what one core spends, whatever else runs)."""
    start = time.process_time()
    for item in items:
        fn(item)
    return time.process_time() - start


def run_decoders(args):
    jpegs = encoded("jpeg", args.images)
    decoders = _decoders()
    reference = None
    print(f"{args.images} JPEGs 500x375 q90 (mean {np.mean([len(j) for j in jpegs]) / 1e3:.0f} kB), one thread, "
          f"CPU time, best of {args.repeats}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    rows = []
    best = {name: [float("inf"), float("inf")] for name in decoders}
    for _ in range(args.repeats):  # decoders interleaved, so that a burst of load hits all of them
        for name, (decode, full) in decoders.items():
            if decode is not None:
                best[name][0] = min(best[name][0], _cpu_time(decode, jpegs))
            best[name][1] = min(best[name][1], _cpu_time(full, jpegs))
    for name, (decode, full) in decoders.items():
        out = full(jpegs[0])
        if reference is None:
            reference = out.astype(np.int16)
        diff = float(np.abs(out.astype(np.int16) - reference).mean())
        decode_rate, full_rate = len(jpegs) / best[name][0], len(jpegs) / best[name][1]
        rows.append({"decoder": name, "decode_images_per_cpu_s": decode_rate if decode is not None else None,
                     "to_224_images_per_cpu_s": full_rate,
                     "mean_abs_diff_vs_first": diff})
        shown = f"{decode_rate:6.0f}/s ({1e3 / decode_rate:5.2f} ms)" if decode is not None else f"{'-':>17}"
        print(f"  {name:<58} decode {shown} | "
              f"decode+resize to 224 {full_rate:6.0f}/s ({1e3 / full_rate:5.2f} ms) | "
              f"mean |diff| vs first {diff:.2f}", flush=True)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"part": "decoders", "rows": rows, "load_average": os.getloadavg(),
                       "cpu_count": os.cpu_count(), "python": sys.version}, f, indent=1)


# --------------------------------------------------------------------------- the loader


def write_shards(root: str, kind: str, n: int, per_shard: int):
    """n images of ``kind`` as webdataset shards root/shard-XXXXX.tar (key.jpg|png + key.cls)."""
    import tarfile

    images = encoded(kind, min(n, 64))  # 64 distinct images, repeated: writing is not what is measured
    ext = "jpg" if kind == "jpeg" else "png"
    os.makedirs(root, exist_ok=True)
    for first in range(0, n, per_shard):
        with tarfile.open(os.path.join(root, f"shard-{first // per_shard:05d}.tar"), "w") as tar:
            for i in range(first, min(n, first + per_shard)):
                for name, data in ((f"{i:08d}.{ext}", images[i % len(images)]), (f"{i:08d}.cls", b"%d" % (i % 10))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return os.path.join(root, "shard-{00000..%05d}.tar" % ((n - 1) // per_shard))


def measure_loader(pattern, image_size, kind, workers, batch, steps, warmup):
    """images/s of the TrainLoader over the shards, decoding in ``workers`` processes or threads (``kind``)."""
    sys.path.insert(0, ROOT)
    from clrjax import benchmarking
    from clrjax.data import pipeline
    from clrjax.data.sources import load_source

    source = load_source({"name": "webdataset", "path": pattern, "image_size": image_size, "channels": 3,
                          "decode_processes": workers if kind == "processes" else 0,
                          "decode_workers": workers, "shuffle_buffer": 1024}, "train")
    pool = source.pool()  # workers started before the clock (a run starts them once)
    pids = list(getattr(pool, "pids", []))
    load = os.getloadavg()[0]
    with pipeline.TrainLoader(source, batch, seed=0, prefetch=2) as loader:
        for _ in range(warmup):
            next(loader)
        parent0, workers0 = time.process_time(), _cpu_seconds(pids)
        times = benchmarking.time_calls(lambda: next(loader)["image"], steps, 0)
        parent_cpu, worker_cpu = time.process_time() - parent0, _cpu_seconds(pids) - workers0
    source.close()
    rate = batch / statistics.median(times)
    images = batch * steps
    # CPU time is what a core spends, whatever else runs on it: images per CPU-second is the per-core rate
    # (threads: the training process's CPU, reading and decoding together; processes: the workers' decoding,
    # and the training process's reading, pickling and batch assembly separately).
    decode_cpu = worker_cpu if pids else parent_cpu
    return {"kind": kind, "workers": workers, "images_per_s": rate, "images_per_s_per_worker": rate / workers,
            "best_images_per_s": batch / min(times), "load_average_before": load,
            "images_per_cpu_second": images / max(decode_cpu, 1e-9),
            "parent_cpu_us_per_image": 1e6 * parent_cpu / images}


def _cpu_seconds(pids):
    """User + system CPU seconds of the processes ``pids`` so far (Linux /proc)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


def run_pipeline(args):
    sys.path.insert(0, ROOT)
    from clrjax import benchmarking

    cores = os.cpu_count() or 1
    def counts(text):
        return sorted({cores if w == "all" else int(w) for w in text.split(",") if w})
    runs = [("processes", w) for w in counts(args.workers)] + [("threads", w) for w in counts(args.threads)]
    result = {"part": "pipeline", "command": " ".join(sys.argv), "environment": benchmarking.environment(),
              "cores": cores, "steps": args.steps, "warmup": args.warmup, "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        cases = (("500x375 JPEG -> 224", "jpeg", 224, args.jpegs, args.batch),
                 ("32x32 PNG (native)", "png", 0, args.pngs, args.png_batch))
        for name, kind, size, n, batch in cases:
            pattern = write_shards(os.path.join(tmp, kind), kind, n, args.per_shard)
            from clrjax.data import webdataset
            webdataset._CACHE.clear()  # pylint: disable=protected-access
            start = time.perf_counter()
            webdataset.index_shards(webdataset.expand_shards(pattern))
            indexing = n / (time.perf_counter() - start)
            result.setdefault("indexing_samples_per_s", {})[name] = indexing
            print(f"{name:<20} index (tar headers, page cache): {indexing:,.0f} samples/s", flush=True)
            for pool, w in runs:
                row = dict(measure_loader(pattern, size, pool, w, batch, args.steps, args.warmup), case=name,
                           batch=batch)
                result["cases"].append(row)
                setting = f"decode_processes={w}" if pool == "processes" else f"decode_workers={w} (threads)"
                print(f"{name:<20} {setting:<30}: {row['images_per_s']:7.0f} images/s ({row['images_per_s_per_worker']:6.0f}"
                      f" per worker) | {row['images_per_cpu_second']:6.0f} images per decode CPU-second | training "
                      f"process {row['parent_cpu_us_per_image']:5.0f} us CPU/image | load average before "
                      f"{row['load_average_before']:.1f}", flush=True)
                with open(args.json_out, "w") as f:
                    json.dump(result, f, indent=1)
    result["complete"] = True
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="part", required=True)
    dec = sub.add_parser("decoders")
    dec.add_argument("--images", type=int, default=200)
    dec.add_argument("--repeats", type=int, default=5)
    dec.add_argument("--json_out", default="")
    pipe = sub.add_parser("pipeline")
    pipe.add_argument("--workers", default="1,2,all", help="decode_processes values ('all' = every core)")
    pipe.add_argument("--threads", default="", help="decode_workers values with decode_processes=0, e.g. 1,2")
    pipe.add_argument("--batch", type=int, default=128, help="global batch of the JPEG case")
    pipe.add_argument("--png_batch", type=int, default=1024, help="global batch of the PNG case")
    pipe.add_argument("--steps", type=int, default=10)
    pipe.add_argument("--warmup", type=int, default=3)
    pipe.add_argument("--jpegs", type=int, default=4096)
    pipe.add_argument("--pngs", type=int, default=32768)
    pipe.add_argument("--per_shard", type=int, default=1000)
    pipe.add_argument("--json_out", default="decode_bench.json")
    args = parser.parse_args()
    run_decoders(args) if args.part == "decoders" else run_pipeline(args)


if __name__ == "__main__":
    main()
