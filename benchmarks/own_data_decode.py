"""Decode speed of your own images (clrjax/data/folders.py): images/s for 500x375 JPEG -> 224 and 32x32 PNG.

    .venv/bin/python benchmarks/own_data_decode.py [--workers 1,2] [--jpegs 200] [--pngs 2000]

Writes the images into a temporary folder (smooth synthetic scenes: a JPEG of
noise would decode slower than a photograph), reads every one once through
``ImageFileSource`` (the path the TrainLoader takes: ``source[indices]`` in
batches of 64), after one warm-up batch, and prints one line per case.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from clrjax.data.sources import load_source  # noqa: E402


def _scene(rng, w, h):
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((w, h), Image.BICUBIC).filter(ImageFilter.GaussianBlur(2))
    noise = rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def write(root, kind, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = os.path.join(root, f"class_{i % 10}")
        os.makedirs(folder, exist_ok=True)
        if kind == "jpeg":
            _scene(rng, 500, 375).save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
        else:
            _scene(rng, 32, 32).save(os.path.join(folder, f"{i:05d}.png"))


def measure(root, image_size, workers, batch=64):
    src = load_source({"name": "image_folder", "path": root, "image_size": image_size, "channels": 3,
                       "decode_workers": workers}, "train")
    src[np.arange(min(batch, len(src)))]  # warm-up (pool start, imports)
    start = time.perf_counter()
    for first in range(0, len(src), batch):
        src[np.arange(first, min(first + batch, len(src)))]
    return len(src) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--jpegs", type=int, default=200)
    parser.add_argument("--pngs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = (("500x375 JPEG -> 224", os.path.join(tmp, "jpeg"), "jpeg", args.jpegs, 224),
                 ("32x32 PNG (native)", os.path.join(tmp, "png"), "png", args.pngs, 0))
        for name, root, kind, n, size in cases:
            write(root, kind, n)
            for workers in (int(w) for w in args.workers.split(",")):
                rate = measure(root, size, workers)
                print(f"{name:<22} decode_workers={workers}: {rate:8.0f} images/s", flush=True)


if __name__ == "__main__":
    main()
