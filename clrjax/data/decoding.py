"""Host-side image decoding: encoded bytes or files -> fixed-size uint8 arrays, in threads or worker processes.

Used by every file source (``folders.py``: image_folder, csv, tsv;
``webdataset.py``: tar shards). This module imports only numpy, Pillow and
(optionally) simplejpeg, never JAX: it is also the program of the decode
worker processes (``python -m clrjax.data.decoding``).

Decoding (:func:`decode_image`)
-------------------------------
* JPEG (recognised by its first bytes, not its name): **simplejpeg**
  (libjpeg-turbo) when it is installed, which decodes at the smallest DCT
  scale M/8 (M = 1..8) that keeps both sides >= the output side S; else, or
  when simplejpeg refuses the file (CMYK, a corrupt or truncated file: Pillow
  then gives the error message), Pillow with ``Image.draft`` (scales 1/2, 1/4,
  1/8 only). simplejpeg was chosen by measurement: BENCHMARKS.md, "Your own
  data" (``benchmarks/decode_bench.py decoders``).
* everything else (PNG, WebP, BMP, ...): Pillow.

Then the image is converted to ``channels`` (1 = 'L', 3 = 'RGB'; alpha is
dropped), and, when ``size`` S > 0, a square of the shorter side is cut
(centred, or at ``offset`` in [0, 1] along the longer side: the host random
crop) and resized (bilinear, antialiased) to S x S. ``size`` 0 keeps the
native size.

Worker processes (:class:`ProcessDecodePool`)
---------------------------------------------
``n`` processes started as ``python -m clrjax.data.decoding`` (a fresh
interpreter: no fork of a process that holds JAX's threads, and unlike
multiprocessing's spawn/forkserver they do not re-import the training
script, so they never import JAX). They ignore SIGINT and SIGTERM (which
reach the whole process group; the training process handles them) and exit
when their stdin closes: when the pool is closed or the training process
ends, however it ends. Each reads tasks (a chunk of encoded
images or file paths) from its stdin and writes the decoded chunk (one uint8
array) to its stdout, both length-prefixed pickles; a sender and a receiver
thread per worker in the parent keep the pipes moving, so many chunks are in
flight at once. A worker that dies fails its pending chunks with
:class:`DecodeWorkerError`, naming its exit status. :class:`ThreadDecodePool`
has the same interface (Pillow and simplejpeg release the GIL while
decoding and resizing, but not for the per-image Python around them).
"""
from __future__ import annotations

import concurrent.futures
import io
import itertools
import os
import pickle
import queue
import re
import subprocess
import sys
import threading
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

_SIMPLEJPEG = []  # [module or None] once looked up: imported on the first JPEG, not with this module
JPEG_MAGIC = b"\xff\xd8\xff"
_HEADER = 8  # bytes of the length prefix of a pickled message

Encoded = Union[bytes, str]  # encoded image bytes, or a file path to read them from


class DecodeWorkerError(RuntimeError):
    """A decode worker process exited (crashed, killed for memory) while decoding."""


# --------------------------------------------------------------------------- one image


def _simplejpeg():
    """The simplejpeg module (the faster JPEG decoder, BENCHMARKS.md), or None where it is not installed."""
    if not _SIMPLEJPEG:
        try:
            import simplejpeg
        except ImportError:  # pragma: no cover - simplejpeg is in setup.py's requirements
            simplejpeg = None
        _SIMPLEJPEG.append(simplejpeg)
    return _SIMPLEJPEG[0]


def jpeg_decoder() -> str:
    """'simplejpeg' or 'pillow': what decodes JPEGs in this interpreter."""
    return "simplejpeg" if _simplejpeg() is not None else "pillow"


def _read(item: Encoded) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    with open(item, "rb") as f:
        return f.read()


def _fit(image, size: int, offset: Optional[float]):
    """PIL image -> its square of the shorter side (centred, or at ``offset`` in [0, 1]) resized to size x size."""
    from PIL import Image

    w, h = image.size
    side = min(w, h)
    if offset is None:
        left, top = (w - side) // 2, (h - side) // 2
    else:
        shift = int(round(min(max(float(offset), 0.0), 1.0) * (max(w, h) - side)))
        left, top = (shift, 0) if w > h else (0, shift)
    if (w, h) != (side, side):
        image = image.crop((left, top, left + side, top + side))  # as sources.center_crop_resize
    if side != size:
        image = image.resize((size, size), Image.BILINEAR, reducing_gap=None)
    return image


def _as_array(image) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _decode_simplejpeg(data: bytes, size: int, channels: int, offset: Optional[float]) -> Optional[np.ndarray]:
    """simplejpeg's decode (DCT-scaled), or None where it cannot (then Pillow decodes or raises)."""
    from PIL import Image

    simplejpeg = _simplejpeg()
    try:
        colorspace = simplejpeg.decode_jpeg_header(data)[2]
        if colorspace not in ("RGB", "YCbCr", "Gray"):  # CMYK / YCCK: Pillow converts those
            return None
        array = simplejpeg.decode_jpeg(data, colorspace="GRAY" if channels == 1 else "RGB",
                                       min_height=size, min_width=size, strict=True)
    except Exception:  # noqa: BLE001 - a corrupt file: Pillow names the problem
        return None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not size:
        return _as_array(array)
    return _as_array(_fit(Image.fromarray(array), size, offset))


def decode_image(item, size: int, channels: int, offset: Optional[float] = None) -> np.ndarray:
    """One encoded image (bytes, a path or a binary file object) -> uint8 [S, S, C] (size S > 0) or [H, W, C].

    ``offset``: None = centred square; a float in [0, 1] = the square's position along the longer side.
    Raises whatever the decoders or the file system raise; the sources turn that into a DataError.
    """
    from PIL import Image  # local: a worker pays for Pillow only when it decodes

    data = item.read() if hasattr(item, "read") else _read(item)
    if data[:3] == JPEG_MAGIC and _simplejpeg() is not None:
        array = _decode_simplejpeg(data, size, channels, offset)
        if array is not None:
            return array
    mode = "L" if channels == 1 else "RGB"
    with Image.open(item if isinstance(item, str) else io.BytesIO(data)) as image:
        if size:
            w, h = image.size
            shorter = min(w, h)
            if image.format == "JPEG" and shorter > size:
                # DCT-domain downscaling: decodes at 1/2, 1/4 or 1/8 while the shorter side stays >= size.
                image.draft(mode, (-(-w * size // shorter), -(-h * size // shorter)))
        image = image.convert(mode)  # decodes (load) and converts (L/P/RGBA/CMYK/I;16 -> mode)
    if size:
        image = _fit(image, size, offset)
    return _as_array(image)


def describe(err: BaseException) -> str:
    """'Type: message' on one line, at most 200 characters of message."""
    text = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "(its bytes)", str(err).replace("\n", " "))[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def decode_chunk(items: Sequence[Encoded], size: int, channels: int, shape: Optional[Tuple[int, int, int]],
                 offsets: Optional[Sequence[float]] = None) -> Tuple[np.ndarray, List[Tuple[int, str, str]]]:
    """Decodes ``items`` into one array; failures are reported, not raised.

    Returns (uint8 [n, *shape], failures): ``failures`` lists (row, kind, description) with kind
    'decode' (the item cannot be decoded or read; its row is left zero) or 'shape' (it decodes to
    another size than ``shape``, which only happens with size 0). ``shape`` None: the first item's.
    """
    out = None
    failures = []
    for row, item in enumerate(items):
        try:
            image = decode_image(item, size, channels, None if offsets is None else offsets[row])
        except Exception as err:  # noqa: BLE001 - Pillow, simplejpeg and the OS raise many types
            failures.append((row, "decode", describe(err)))
            continue
        if out is None:
            shape = tuple(shape) if shape is not None else image.shape
            out = np.zeros((len(items),) + shape, np.uint8)
        if image.shape != out.shape[1:]:
            failures.append((row, "shape", f"{image.shape[1]}x{image.shape[0]}x{image.shape[2]}"))
            continue
        out[row] = image
    if out is None:
        out = np.zeros((len(items),) + (tuple(shape) if shape is not None else (0, 0, channels)), np.uint8)
    return out, failures


# --------------------------------------------------------------------------- pools


class ThreadDecodePool:
    """:func:`decode_chunk` in ``threads`` threads of this process: ``submit(...) -> Future``."""

    kind = "threads"

    def __init__(self, threads: int):
        self.size = max(1, int(threads))
        self._executor = concurrent.futures.ThreadPoolExecutor(self.size, "clrjax-decode")

    def submit(self, items, size, channels, shape, offsets=None) -> concurrent.futures.Future:
        return self._executor.submit(decode_chunk, list(items), size, channels, shape, offsets)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _send(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(len(data).to_bytes(_HEADER, "little"))
    stream.write(data)
    stream.flush()


def _receive(stream):
    """The next message, or None at the end of the stream."""
    header = stream.read(_HEADER)
    if len(header) < _HEADER:
        return None
    n = int.from_bytes(header, "little")
    data = stream.read(n)
    if len(data) < n:
        return None
    return pickle.loads(data)


class _Worker:
    """One decode process and the two parent threads that feed and drain its pipes."""

    def __init__(self, index: int, env: dict):
        self.index = index
        self.process = subprocess.Popen([sys.executable, "-m", "clrjax.data.decoding"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, close_fds=True)
        self.pending = {}  # task id -> Future
        self.lock = threading.Lock()
        self.dead: Optional[str] = None
        self._outbox: "queue.Queue" = queue.Queue()
        self._sender = threading.Thread(target=self._send_loop, name=f"clrjax-decode-send-{index}", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name=f"clrjax-decode-recv-{index}", daemon=True)
        self._sender.start()
        self._receiver.start()

    def submit(self, task_id: int, payload, future) -> None:
        with self.lock:
            if self.dead is not None:
                future.set_exception(DecodeWorkerError(self.dead))
                return
            self.pending[task_id] = future
        self._outbox.put((task_id, payload))

    def load(self) -> int:
        return len(self.pending)

    def _send_loop(self) -> None:
        try:
            while True:
                task = self._outbox.get()
                if task is None:
                    break
                _send(self.process.stdin, task)
        except (BrokenPipeError, OSError, ValueError):
            pass  # the receiver reports the worker's exit
        finally:
            try:
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass

    def _receive_loop(self) -> None:
        while True:
            try:
                message = _receive(self.process.stdout)
            except (OSError, ValueError, pickle.UnpicklingError, EOFError):
                message = None
            if message is None:
                break
            task_id, result, error = message
            with self.lock:
                future = self.pending.pop(task_id, None)
            if future is None:
                continue
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(DecodeWorkerError(f"decode worker {self.process.pid}: {error}"))
        status = self.process.wait()
        with self.lock:
            self.dead = (f"decode worker process {self.process.pid} exited with status {status} "
                         f"(its messages, if any, are above on stderr); lower --config.dataset.decode_processes "
                         f"if it was killed for memory")
            pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DecodeWorkerError(self.dead))

    def close(self, timeout: float = 5.0) -> None:
        self._outbox.put(None)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._receiver.join(timeout=timeout)


def _close_workers(workers) -> None:
    for worker in workers:
        worker._outbox.put(None)  # pylint: disable=protected-access
    for worker in workers:
        worker.close()


class ProcessDecodePool:
    """:func:`decode_chunk` in ``processes`` worker processes: ``submit(...) -> Future`` (see the module docstring).

    A chunk goes to the worker with the fewest chunks pending. ``close()`` (also at garbage
    collection and interpreter exit) ends the workers: they exit when their stdin closes.
    """

    kind = "processes"

    def __init__(self, processes: int):
        self.size = max(1, int(processes))
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self._workers = [_Worker(i, env) for i in range(self.size)]
        self._ids = itertools.count()
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)

    @property
    def pids(self) -> List[int]:
        return [w.process.pid for w in self._workers]

    def submit(self, items, size, channels, shape, offsets=None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        worker = min(self._workers, key=lambda w: w.load())  # a dead worker fails the chunks sent to it
        items = [bytes(i) if isinstance(i, (bytearray, memoryview)) else i for i in items]
        offsets = None if offsets is None else [float(o) for o in offsets]
        worker.submit(next(self._ids), (items, int(size), int(channels),
                                        None if shape is None else tuple(int(s) for s in shape), offsets), future)
        return future

    def close(self) -> None:
        self._finalizer()


def make_pool(processes: int, threads: int):
    """``processes`` > 0: a :class:`ProcessDecodePool`; else a :class:`ThreadDecodePool` of ``threads``."""
    return ProcessDecodePool(processes) if processes > 0 else ThreadDecodePool(threads)


# --------------------------------------------------------------------------- the worker program


def _worker_main() -> None:
    """Reads (task id, decode_chunk arguments) from stdin, writes (task id, result, error) to stdout."""
    import signal

    # Ctrl-C and a preemption's SIGTERM reach the whole process group: the training process
    # handles them (saves and exits) and then closes this worker's stdin, which ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    inbox, outbox = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the result stream
    while True:
        message = _receive(inbox)
        if message is None:
            return
        task_id, args = message
        try:
            reply = (task_id, decode_chunk(*args), None)
        except Exception as err:  # noqa: BLE001 - reported to the parent, which raises it
            reply = (task_id, None, describe(err))
        try:
            _send(outbox, reply)
        except (BrokenPipeError, OSError):
            return


if __name__ == "__main__":
    _worker_main()
