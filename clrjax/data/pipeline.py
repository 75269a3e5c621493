"""Deterministic, resumable, per-process sharded host input.

Determinism contract of :class:`TrainLoader` (what resumption, multi-host
training and per-example augmentation keys rely on):

* ``steps_per_epoch = len(source) // global_batch``; the remainder of each
  epoch is dropped, so every step has a full global batch.
* Epoch e visits the dataset in the order ``perm_e = permutation(N)`` drawn
  from ``np.random.default_rng(SeedSequence([seed, e]))``.
* The global batch of step s (epoch e = s // steps_per_epoch, position
  t = s % steps_per_epoch) is ``perm_e[t*B : (t+1)*B]``: it depends on
  (seed, s) only, never on the number of processes or devices.
* Process p of P reads rows ``[p*B/P, (p+1)*B/P)`` of that global batch, so the
  process-order concatenation of the local batches (what
  ``jax.make_array_from_process_local_data`` builds) is the global batch.
* ``index`` = s*B + row in the global batch is a unique global example counter
  (wrapping modulo 2**32, i.e. after 4.3e9 examples); augmentations derive
  their keys from it with ``fold_in``.

Resuming: ``TrainLoader(..., start_step=state['step'])`` yields exactly the
stream that the saved loader would have yielded next.

Readers. The contract above is owned here, not by grain: grain's samplers
and shuffles would give a different (equally deterministic) order. What reads
the stream depends on the source (``reader='auto'``):

* TFDS array_record sources (anything with ``data_source`` and ``decode``,
  i.e. ``TfdsSource``) are read **with grain** (:mod:`clrjax.data.grain_reader`):
  grain's ``MapDataset.source(data_source)`` reads exactly this process's
  index stream (``local_rows(s)`` for s = start_step, ...), in chunks of a
  step's rows, and decodes/crops in grain's read threads with a read-ahead
  buffer that spans batches; whole batches are built ahead in a background
  thread.
* in-memory sources (digits, fashion_mnist, synthetic) are read directly:
  ``source[local_rows(s)]`` is one fancy-indexing call that grain's threads
  would only add hand-offs to.

Both readers yield identical batches (:meth:`TrainLoader.batch_at` is the
direct reader's batch and the reference); the position is the step in both,
so ``state()`` stays ``{'step': s}`` and is all a checkpoint needs.
"""
from __future__ import annotations

import queue
import threading
from typing import Dict, Iterator, Optional

import numpy as np

from clrjax.data.records import has_record_source

Batch = Dict[str, np.ndarray]


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: int64 [N], a permutation of range(N).

    Drawn from PCG64 seeded by ``SeedSequence([seed, epoch])``, which numpy
    keeps stable across versions for ``Generator.permutation``.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_examples)


def _check_sharding(global_batch: int, process_index: int, process_count: int) -> int:
    if process_count <= 0 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, process_count), got {process_index} of {process_count}")
    if global_batch <= 0 or global_batch % process_count:
        raise ValueError(f"the global batch ({global_batch}) must be a positive multiple of the process count "
                         f"({process_count}) so that every process reads the same number of rows")
    return global_batch // process_count


def _as_int32_counter(values: np.ndarray) -> np.ndarray:
    """int64 counters -> int32, wrapping modulo 2**32 (fold_in only sees the 32 bits anyway)."""
    return values.astype(np.uint32).view(np.int32)


class _Prefetcher:
    """Runs ``produce(step)`` for step = start, start+1, ... in a background thread.

    Results go through a bounded queue of ``depth`` batches, so at most that
    many batches wait in memory. An exception in the thread is re-raised by
    :meth:`get`. :meth:`close` stops the thread and waits for it.
    """

    def __init__(self, produce, start: int, depth: int):
        self._produce = produce
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), name="clrjax-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, step: int) -> None:
        while not self._stop.is_set():
            try:
                item = (step, self._produce(step), None)
            except BaseException as e:  # handed to the consumer, which re-raises it
                self._put((step, None, e))
                return
            if not self._put(item):
                return
            step += 1

    def get(self, expected_step: int) -> Batch:
        while True:
            if self._stop.is_set():
                raise RuntimeError("the loader is closed")
            try:
                step, batch, error = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the prefetch thread died without reporting an error")
        if error is not None:
            raise error
        assert step == expected_step, (step, expected_step)
        return batch

    def close(self) -> None:
        self._stop.set()
        while True:  # free a producer blocked on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=30)


class TrainLoader:
    """Infinite iterator over this process's rows of the deterministic global batches.

    Args:
      source: random-access source (``clrjax.data.sources``).
      global_batch: B, images per step over all processes.
      seed: non-negative seed of the epoch permutations.
      process_index, process_count: p and P; this process yields B/P rows.
      start_step: the first step yielded (resume from ``state()['step']``).
      prefetch: batches prepared ahead in a background thread; 0 = none (the direct
        reader is then synchronous; grain still reads ahead ``read_ahead`` examples).
      reader: 'auto' (grain for sources with a raw record source, i.e. TFDS, else
        direct), 'grain' (any source; non-TFDS ones are read via ``source[i]``) or 'direct'.
      read_threads: grain read/decode threads; default the source's ``num_threads``
        attribute (TfdsSource) or 8.
      read_ahead: examples grain reads ahead of the consumer; default two local batches.
      read_chunk: examples per grain read unit (default 32; see ``clrjax.data.grain_reader``).

    Yields:
      ``{'image': uint8 [B/P, H, W, C], 'label': int32 [B/P], 'index': int32 [B/P]}``.

    Use as a context manager, or call :meth:`close`, to stop the thread.
    """

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                 start_step: int = 0, prefetch: int = 2, reader: str = "auto",
                 read_threads: Optional[int] = None, read_ahead: Optional[int] = None,
                 read_chunk: Optional[int] = None):
        self.local_batch = _check_sharding(global_batch, process_index, process_count)
        if global_batch > len(source):
            raise ValueError(f"the global batch ({global_batch}) is larger than the dataset ({len(source)} "
                             f"examples), so an epoch would have no step; lower the batch size")
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed and start_step must be non-negative, got {seed} and {start_step}")
        self.source = source
        self.global_batch = global_batch
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = len(source) // global_batch
        self._step = int(start_step)
        self._perm_cache: Dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()
        self._prefetch_depth = int(prefetch)
        self._prefetcher: Optional[_Prefetcher] = None
        self._closed = False
        if reader not in ("auto", "grain", "direct"):
            raise ValueError(f"reader must be 'auto', 'grain' or 'direct', got {reader!r}")
        if reader == "auto":
            reader = "grain" if has_record_source(source) else "direct"
        self.reader = reader
        if read_threads is None:
            read_threads = int(getattr(source, "num_threads", 8))
        self._read_threads, self._read_ahead, self._read_chunk = int(read_threads), read_ahead, read_chunk
        self._grain_iter = None  # grain DatasetIterator, created on the first next()

    # -- the contract

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._perm_lock:
            if epoch not in self._perm_cache:
                # Keep the current and next epoch only: the prefetcher runs a few steps ahead.
                for old in [e for e in self._perm_cache if e < epoch - 1]:
                    del self._perm_cache[old]
                self._perm_cache[epoch] = epoch_permutation(len(self.source), self.seed, epoch)
            return self._perm_cache[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """Dataset indices of the global batch of ``step``: int64 [B]."""
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return self._permutation(epoch)[start:start + self.global_batch]

    def local_rows(self, step: int) -> np.ndarray:
        """Dataset indices of this process's rows of ``step``: int64 [B/P] (what every reader reads)."""
        first = self.process_index * self.local_batch
        return self.global_rows(step)[first:first + self.local_batch]

    def local_counters(self, step: int) -> np.ndarray:
        """The ``index`` field of this process's batch of ``step``: int32 [B/P], s*B + row (wrapped)."""
        first = self.process_index * self.local_batch
        counter = np.int64(step) * self.global_batch + first + np.arange(self.local_batch, dtype=np.int64)
        return _as_int32_counter(counter)

    def batch_at(self, step: int) -> Batch:
        """This process's batch of ``step`` read directly (``source[rows]``), synchronously.

        No prefetch, no state change; the reference that the grain reader matches.
        """
        batch = dict(self.source[self.local_rows(step)])
        batch["image"] = np.asarray(batch["image"], np.uint8)
        batch["label"] = np.asarray(batch["label"], np.int32)
        batch["index"] = self.local_counters(step)
        return batch

    # -- iteration and state

    def state(self) -> Dict[str, int]:
        """{'step': the step of the next batch to be returned}; pass it back as start_step."""
        return {"step": self._step}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the loader is closed")
        if self.reader == "grain":
            batch = self._next_from_grain()
        elif self._prefetch_depth <= 0:
            batch = self.batch_at(self._step)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self.batch_at, self._step, self._prefetch_depth)
            batch = self._prefetcher.get(self._step)
        self._step += 1
        return batch

    def _next_from_grain(self) -> Batch:
        if self._grain_iter is None:
            from clrjax.data import grain_reader  # local: importing grain costs ~1 s

            stream = grain_reader.build_stream(self, self._step, read_threads=self._read_threads,
                                               read_ahead=self._read_ahead, batch_prefetch=self._prefetch_depth,
                                               read_chunk=self._read_chunk or grain_reader.DEFAULT_READ_CHUNK)
            self._grain_iter = iter(stream)
        batch = next(self._grain_iter)
        # The stream is built from the step; the counters prove it is still aligned with it.
        expected = self.local_counters(self._step)
        if batch["index"][0] != expected[0] or len(batch["index"]) != len(expected):
            raise RuntimeError(f"grain stream out of step: got counters from {batch['index'][0]}, "
                               f"expected step {self._step} ({expected[0]})")
        return batch

    def close(self) -> None:
        """Stops the prefetch/read threads; the loader cannot be iterated afterwards."""
        self._closed = True
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None
        if self._grain_iter is not None:
            self._grain_iter.close()
            self._grain_iter = None

    def __enter__(self) -> "TrainLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def num_eval_batches(num_examples: int, batch_size: int) -> int:
    """ceil(N / batch_size): the same on every process, so collective eval steps line up."""
    return -(-num_examples // batch_size)


def eval_batches(source, batch_size: int, process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """Every example of ``source`` once, in dataset order, in global batches of ``batch_size``.

    Global batch k covers examples [k*B, (k+1)*B); process p yields rows
    [p*B/P, (p+1)*B/P) of it. Positions past the end of the dataset are padded
    with zero images, label 0 and ``mask`` False, so that summing over masked
    rows counts every example exactly once. All processes yield the same
    number of batches.

    Yields:
      ``{'image': uint8 [B/P, H, W, C], 'label': int32 [B/P], 'mask': bool [B/P],
      'index': int32 [B/P] (dataset index; 0 for padding)}``.
    """
    local = _check_sharding(batch_size, process_index, process_count)
    n = len(source)
    for k in range(num_eval_batches(n, batch_size)):
        positions = k * batch_size + process_index * local + np.arange(local)
        mask = positions < n
        valid = positions[mask]
        image = np.zeros((local,) + tuple(source.image_shape), np.uint8)
        label = np.zeros((local,), np.int32)
        if len(valid):
            # valid rows are a prefix: padding only ever sits at the end of the split
            got = source[valid]
            image[:len(valid)] = got["image"]
            label[:len(valid)] = got["label"]
        yield {"image": image, "label": label, "mask": mask,
               "index": np.where(mask, positions, 0).astype(np.int32)}
