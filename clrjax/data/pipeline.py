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

Streaming sources (tar shards, ``clrjax/data/webdataset.py``: anything with
``streaming = True``) cannot be read in a random order cheaply, so they have
their own contract, :class:`ShardPlan`, read by reader 'stream'
(:class:`_StreamReader`):

* epoch e reads the shards in the order ``permutation(num_shards)`` from
  ``SeedSequence([seed, e])``; the concatenation of their N examples in that
  order is cut into P equal parts of ``M = N // P`` examples, and process p
  reads part p (so every example is read by at most one process per epoch;
  a shard can be split between processes, and shards < processes works);
* process p yields the first ``steps_per_epoch * B/P`` examples of its part
  (``steps_per_epoch = N // B``, as for random-access sources: every process
  yields the same number of batches, whatever the shard sizes; at most
  ``N - steps_per_epoch * B`` examples a epoch are not read, a different set
  each epoch because the shard order changes);
* the shuffle buffer: process p's stream of an epoch is cut into blocks of
  K = ``shuffle_buffer`` examples, and block b is yielded in the order
  ``permutation(len(block))`` from ``SeedSequence([seed, e, p, b, STREAM_TAG])``;
* step s yields positions ``[t*B/P, (t+1)*B/P)`` (t = s % steps_per_epoch) of
  that shuffled stream, with the same ``index`` counters as above.

So the batch of step s is a function of (seed, s, P, the shards' sample
counts): resuming at step s re-reads only the block holding the step's first
example (seeking to its shard and offset, reading at most K examples' bytes,
decoding none that are not yielded). Unlike random-access sources, the
global batch depends on the process count P: resume with the same P.
"""
from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Dict, Iterator, Optional

import numpy as np

from clrjax.data import captions as captions_lib
from clrjax.data.records import has_record_source

Batch = Dict[str, np.ndarray]
# Host bookkeeping between reading a step and yielding it: bool [B/P], the rows whose caption was
# cut to the context length (image-text data); never in a yielded batch.
CUT_FIELD = "_text_cut"


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The visiting order of epoch ``epoch``: int64 [N], a permutation of range(N).

    Drawn from PCG64 seeded by ``SeedSequence([seed, epoch])``, which numpy
    keeps stable across versions for ``Generator.permutation``.
    """
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(num_examples)


STREAM_TAG = 0x5EED  # in the block shuffles' seeds, to keep them apart from any other [seed, epoch, ...] draw
_UINT64 = np.uint64


def crop_offsets(seed: int, counters: np.ndarray) -> np.ndarray:
    """float64 [n] in [0, 1): where the host random crop cuts each image's square (``dataset.host_crop='random'``).

    A splitmix64 hash of (seed, the example's ``index`` counter): a function of (seed, step, row),
    so resumed and uninterrupted runs cut the same squares.
    """
    with np.errstate(over="ignore"):
        z = (np.asarray(counters).astype(np.int64).astype(np.uint64)
             + _UINT64((int(seed) * 0x9E3779B97F4A7C15) % 2**64) + _UINT64(0x9E3779B97F4A7C15))
        z = (z ^ (z >> _UINT64(30))) * _UINT64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _UINT64(27))) * _UINT64(0x94D049BB133111EB)
        z = z ^ (z >> _UINT64(31))
    return (z >> _UINT64(11)).astype(np.float64) / float(2**53)


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

    def __init__(self, produce, start: int, depth: int, name: str = "clrjax-prefetch"):
        self._produce = produce
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(start,), name=name, daemon=True)
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
                    raise RuntimeError(f"the {self._thread.name} thread died without reporting an error")
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


# --------------------------------------------------------------------------- streaming sources (tar shards)


class ShardPlan:
    """Which examples each process reads at each step of a streaming source (module docstring).

    Args:
      shard_sizes: examples per shard, in dataset order (example ids are positions in that order).
      global_batch, seed, process_count: B, the seed and P.
      buffer: K, examples per shuffle block (capped at the examples a process yields per epoch).
    """

    def __init__(self, shard_sizes, global_batch: int, seed: int, process_count: int, buffer: int):
        self.sizes = np.asarray(shard_sizes, np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self.num_examples = int(self.sizes.sum())
        self.global_batch, self.seed, self.process_count = int(global_batch), int(seed), int(process_count)
        self.local_batch = self.global_batch // self.process_count
        self.steps_per_epoch = self.num_examples // self.global_batch
        self.per_process = self.num_examples // self.process_count
        self.epoch_length = self.steps_per_epoch * self.local_batch  # examples a process yields per epoch
        self.buffer = max(1, min(int(buffer), self.epoch_length))
        self._lock = threading.Lock()
        self._orders: Dict[int, np.ndarray] = {}
        self._blocks: Dict[tuple, np.ndarray] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._orders:
                for old in [e for e in self._orders if e < epoch - 1]:
                    del self._orders[old]
                self._orders[epoch] = epoch_permutation(len(self.sizes), self.seed, epoch)
            return self._orders[epoch]

    def segments(self, epoch: int, process: int, lo: int, hi: int):
        """Positions [lo, hi) of the process's epoch stream (before shuffling) as (shard, start, stop) runs."""
        order = self.shard_order(epoch)
        ends = np.cumsum(self.sizes[order])
        a, b = process * self.per_process + lo, process * self.per_process + hi
        k = int(np.searchsorted(ends, a, side="right"))
        out = []
        while a < b:
            shard = int(order[k])
            shard_first = int(ends[k] - self.sizes[shard])
            stop = min(b, int(ends[k]))
            out.append((shard, a - shard_first, stop - shard_first))
            a, k = stop, k + 1
        return out

    def block_range(self, block: int):
        return block * self.buffer, min(self.epoch_length, (block + 1) * self.buffer)

    def block_permutation(self, epoch: int, process: int, block: int, n: int) -> np.ndarray:
        seq = np.random.SeedSequence([self.seed, epoch, process, block, STREAM_TAG])
        return np.random.default_rng(seq).permutation(n)

    def block_ids(self, epoch: int, process: int, block: int) -> np.ndarray:
        """Example ids of a block in the order it is yielded: int64 [<= K]."""
        key = (epoch, process, block)
        with self._lock:
            hit = self._blocks.get(key)
        if hit is not None:
            return hit
        lo, hi = self.block_range(block)
        ids = np.concatenate([self.starts[shard] + np.arange(a, b, dtype=np.int64)
                              for shard, a, b in self.segments(epoch, process, lo, hi)])
        ids = ids[self.block_permutation(epoch, process, block, len(ids))]
        with self._lock:
            if len(self._blocks) > 8:
                self._blocks.clear()
            self._blocks[key] = ids
        return ids

    def blocks_of_step(self, step: int):
        """(epoch, [(block, first, last) ...]): the blocks holding the step's positions, slices within each."""
        epoch, position = divmod(int(step), self.steps_per_epoch)
        lo, hi = position * self.local_batch, (position + 1) * self.local_batch
        parts = []
        for block in range(lo // self.buffer, (hi - 1) // self.buffer + 1):
            b_lo, b_hi = self.block_range(block)
            parts.append((block, max(lo, b_lo) - b_lo, min(hi, b_hi) - b_lo))
        return epoch, parts

    def local_rows(self, step: int, process: int) -> np.ndarray:
        """Example ids the process yields at ``step``: int64 [B/P]."""
        epoch, parts = self.blocks_of_step(step)
        return np.concatenate([self.block_ids(epoch, process, block)[a:b] for block, a, b in parts])

    def position(self, step: int, process: int) -> Dict[str, int]:
        """Where the process's stream of ``step`` starts reading: epoch, block, its first shard and offset, skip."""
        epoch, parts = self.blocks_of_step(step)
        block, skip, _ = parts[0]
        lo, hi = self.block_range(block)
        shard, offset, _ = self.segments(epoch, process, lo, hi)[0]
        return {"epoch": int(epoch), "block": int(block), "shard": int(shard), "offset": int(offset),
                "skip": int(skip), "process_count": self.process_count}


class _Block:
    """One shuffle block read from the shards: ids and image bytes in the order they are yielded."""

    def __init__(self, ids: np.ndarray, data: list):
        self.ids, self.data = ids, data


class _StepJob:
    """One step's decode chunks in flight (``futures``: (first row, Future))."""

    def __init__(self, step, rows, futures, parts, offsets):
        self.step, self.rows, self.futures, self.parts, self.offsets = step, rows, futures, parts, offsets
        self.text = None  # (tokens, cut) of ``rows``, made in the reader thread (image-text data)


class _StreamReader(_Prefetcher):
    """Reads, shuffles and submits for decoding a streaming source's steps; assembles the batches.

    A reader thread walks the steps from ``start``: it reads the shuffle blocks the step needs
    (the next block is read ahead in a second thread), cuts the step's examples into chunks and
    submits them to the source's decode pool (worker processes or threads), and queues the step.
    At most ``depth`` steps are queued, so at most ``depth * B/P`` decoded images and three blocks
    of encoded bytes wait in memory. :meth:`next_batch` waits for a step's chunks and builds its
    batch (replacing images that do not decode, with on_error='skip').
    """

    def __init__(self, loader, start: int, depth: int):
        self._loader = loader
        self._blocks = _BlockCache(loader, read_ahead=True)
        super().__init__(lambda step: loader._submit_step(step, self._blocks), start, max(1, depth),
                         name="clrjax-stream")

    def next_batch(self, expected_step: int) -> Batch:
        return self._loader._finish_step(self.get(expected_step))

    def close(self) -> None:
        super().close()
        self._blocks.close()


class _BlockCache:
    """The shuffle blocks of one process's stream, read on demand (and the next one ahead)."""

    def __init__(self, loader, read_ahead: bool):
        self._loader = loader
        self._blocks: Dict[tuple, _Block] = {}
        self._ahead: Dict[tuple, "concurrent.futures.Future"] = {}
        self._executor = (concurrent.futures.ThreadPoolExecutor(1, "clrjax-stream-read") if read_ahead else None)

    def _read(self, epoch: int, block: int) -> _Block:
        loader = self._loader
        plan, source, p = loader.plan, loader.source, loader.process_index
        lo, hi = plan.block_range(block)
        data = []
        for shard, a, b in plan.segments(epoch, p, lo, hi):
            data += [raw for _, raw in source.read_raw(shard, a, b)]
        perm = plan.block_permutation(epoch, p, block, len(data))
        return _Block(plan.block_ids(epoch, p, block), [data[i] for i in perm])

    def get(self, epoch: int, block: int) -> _Block:
        key = (epoch, block)
        if key not in self._blocks:
            future = self._ahead.pop(key, None)
            self._blocks[key] = future.result() if future is not None else self._read(epoch, block)
            for old in [k for k in self._blocks if k < key][:-1]:  # keep this block and the one before
                del self._blocks[old]
        if self._executor is not None:
            upcoming = self._next_key(epoch, block)
            if upcoming not in self._blocks and upcoming not in self._ahead:
                for stale in [k for k in self._ahead if k < key]:
                    self._ahead.pop(stale).cancel()
                self._ahead[upcoming] = self._executor.submit(self._read, *upcoming)
        return self._blocks[key]

    def _next_key(self, epoch: int, block: int) -> tuple:
        plan = self._loader.plan
        return (epoch, block + 1) if plan.block_range(block + 1)[0] < plan.epoch_length else (epoch + 1, 0)

    def close(self) -> None:
        if self._executor is not None:
            for future in self._ahead.values():
                future.cancel()
            self._executor.shutdown(wait=True)
        self._blocks.clear()


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
      reader: 'auto' (stream for streaming sources, i.e. tar shards; grain for sources with a
        raw record source, i.e. TFDS; else direct), 'grain' (any random-access source; non-TFDS
        ones are read via ``source[i]``), 'direct' or 'stream' (streaming sources only).
      read_threads: grain read/decode threads; default the source's ``num_threads``
        attribute (TfdsSource) or 8.
      read_ahead: examples grain reads ahead of the consumer; default two local batches.
      read_chunk: examples per grain read unit (default 32; see ``clrjax.data.grain_reader``).
      shuffle_buffer: stream reader: examples per shuffle block; default the source's
        ``shuffle_buffer`` (``dataset.shuffle_buffer``).
      tokenizer: image-text data (``clrjax.data.tokenizers``; default the source's ``tokenizer``
        attribute, if any): batches gain ``'text'`` int32 [B/P, L], each row's caption of the
        epoch (:func:`clrjax.data.captions.caption_choice`: a function of (seed, epoch, example),
        so the same on any process count and after resume) tokenized to ``tokenizer.context_length``;
        the source must have captions (``dataset.caption_column``). ``captions_cut`` counts
        the captions cut to fit in the batches this loader has yielded (counted when a batch is
        yielded, not when it is read ahead; so after ``k`` batches it is the count of steps
        ``start_step .. start_step + k - 1`` of this process's rows, whatever the prefetch).

    A source with ``host_crop == 'random'`` (``dataset.host_crop``) gets each image's square cut
    at :func:`crop_offsets` instead of the centre (``source.load(rows, offsets)``; the stream
    reader passes them to its decoders).

    Yields:
      ``{'image': uint8 [B/P, H, W, C], 'label': int32 [B/P], 'index': int32 [B/P]}``
      (and ``'text': int32 [B/P, L]`` with a tokenizer).

    Use as a context manager, or call :meth:`close`, to stop the thread.
    """

    def __init__(self, source, global_batch: int, seed: int, process_index: int = 0, process_count: int = 1,
                 start_step: int = 0, prefetch: int = 2, reader: str = "auto",
                 read_threads: Optional[int] = None, read_ahead: Optional[int] = None,
                 read_chunk: Optional[int] = None, shuffle_buffer: Optional[int] = None, tokenizer=None):
        self.local_batch = _check_sharding(global_batch, process_index, process_count)
        if global_batch > len(source):
            raise ValueError(f"the global batch ({global_batch}) is larger than the dataset ({len(source)} "
                             f"examples), so an epoch would have no step; lower the batch size")
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed and start_step must be non-negative, got {seed} and {start_step}")
        self.source = source
        self.tokenizer = tokenizer if tokenizer is not None else getattr(source, "tokenizer", None)
        captions_lib.check_captioned(source, self.tokenizer)
        self.captions_cut = 0  # captions cut to the context length in the batches yielded so far
        self.global_batch = global_batch
        self.seed = int(seed)
        self.process_index, self.process_count = process_index, process_count
        self.steps_per_epoch = len(source) // global_batch
        self._host_crop = getattr(source, "host_crop", "center") == "random"
        self._step = int(start_step)
        self._perm_cache: Dict[int, np.ndarray] = {}
        self._perm_lock = threading.Lock()
        self._prefetch_depth = int(prefetch)
        self._prefetcher: Optional[_Prefetcher] = None
        self._closed = False
        if reader not in ("auto", "grain", "direct", "stream"):
            raise ValueError(f"reader must be 'auto', 'grain', 'direct' or 'stream', got {reader!r}")
        streaming = bool(getattr(source, "streaming", False))
        if reader == "auto":
            reader = "stream" if streaming else ("grain" if has_record_source(source) else "direct")
        if (reader == "stream") != streaming:
            raise ValueError(f"reader {reader!r} does not read a {'streaming' if streaming else 'random-access'} "
                             f"source; use reader='auto'")
        self.reader = reader
        self.plan: Optional[ShardPlan] = None
        self._stream: Optional[_StreamReader] = None
        self._sync_blocks: Optional[_BlockCache] = None
        if streaming:
            buffer = int(shuffle_buffer if shuffle_buffer is not None else getattr(source, "shuffle_buffer", 4096))
            self.plan = ShardPlan(source.shard_sizes, global_batch, seed, process_count, buffer)
            self.steps_per_epoch = self.plan.steps_per_epoch
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
        if self.plan is not None:
            return np.concatenate([self.plan.local_rows(step, p) for p in range(self.process_count)])
        epoch, position = divmod(step, self.steps_per_epoch)
        start = position * self.global_batch
        return self._permutation(epoch)[start:start + self.global_batch]

    def local_rows(self, step: int) -> np.ndarray:
        """Dataset indices of this process's rows of ``step``: int64 [B/P] (what every reader reads)."""
        if self.plan is not None:
            return self.plan.local_rows(step, self.process_index)
        first = self.process_index * self.local_batch
        return self.global_rows(step)[first:first + self.local_batch]

    def local_counters(self, step: int) -> np.ndarray:
        """The ``index`` field of this process's batch of ``step``: int32 [B/P], s*B + row (wrapped)."""
        first = self.process_index * self.local_batch
        counter = np.int64(step) * self.global_batch + first + np.arange(self.local_batch, dtype=np.int64)
        return _as_int32_counter(counter)

    def batch_at(self, step: int) -> Batch:
        """This process's batch of ``step`` read directly (``source[rows]``), synchronously.

        No prefetch, no state change (``captions_cut`` counts only what iteration yields); the
        reference that the grain reader matches. For a streaming source: the stream reader's
        batch, read and decoded synchronously (reading the step's shuffle block, kept for the
        next call).
        """
        batch = self._read_step(step)
        batch.pop(CUT_FIELD, None)
        return batch

    def _read_step(self, step: int) -> Batch:
        """:meth:`batch_at` with the ``CUT_FIELD`` of image-text data still in it (the prefetcher's producer)."""
        if self.plan is not None:
            if self._sync_blocks is None:
                self._sync_blocks = _BlockCache(self, read_ahead=False)
            return self._finish_step(self._submit_step(step, self._sync_blocks))
        rows = self.local_rows(step)
        if self._host_crop:
            batch = dict(self.source.load(rows, crop_offsets(self.seed, self.local_counters(step))))
        else:
            batch = dict(self.source[rows])
        batch["image"] = np.asarray(batch["image"], np.uint8)
        batch["label"] = np.asarray(batch["label"], np.int32)
        batch["index"] = self.local_counters(step)
        return self._add_text(batch, step)

    # -- captions (image-text data)

    def _add_text(self, batch: Batch, step: int) -> Batch:
        """The ``'text'`` field: int32 [B/P, L], the tokenized caption of each row (clrjax/data/captions.py).

        ``batch['id']`` (sources that may replace an undecodable image) names the example each row
        holds, so its caption is that example's; else the rows are :meth:`local_rows`. Removed either way.
        ``batch[CUT_FIELD]``: which rows' captions were cut, until :meth:`__next__` counts them.
        """
        ids = batch.pop("id", None)
        if self.tokenizer is None:
            return batch
        if ids is None:
            ids = self.local_rows(step)
        batch["text"], batch[CUT_FIELD] = self._text_of(step, ids)
        return batch

    def _text_of(self, step: int, ids: np.ndarray):
        return captions_lib.text_field(self.source, self.tokenizer, self.seed, int(step) // self.steps_per_epoch, ids)

    def _yield(self, batch: Batch) -> Batch:
        """The batch as iteration yields it: its cut captions counted (here, when it is consumed, so a
        batch read ahead and never consumed, e.g. at a checkpoint, is not counted) and the field dropped."""
        cut = batch.pop(CUT_FIELD, None)
        if cut is not None:
            self.captions_cut += int(np.count_nonzero(cut))
        return batch

    # -- the stream reader (streaming sources)

    def _chunk(self, pool) -> int:
        return max(1, min(self.local_batch, max(8, min(64, self.local_batch // (2 * pool.size)))))

    def _submit_step(self, step: int, blocks: "_BlockCache") -> _StepJob:
        """Reads the step's examples (from its shuffle blocks) and submits their decoding in chunks."""
        source = self.source
        epoch, parts = self.plan.blocks_of_step(step)
        data, rows, where = [], [], []
        for block, a, b in parts:
            got = blocks.get(epoch, block)
            data += got.data[a:b]
            rows.append(got.ids[a:b])
            where += [(got, j) for j in range(a, b)]
        offsets = crop_offsets(self.seed, self.local_counters(step)) if self._host_crop else None
        pool = source.pool()
        chunk = self._chunk(pool)
        futures = [(lo, pool.submit(data[lo:lo + chunk], source.image_size, source.channels, source.image_shape,
                                    None if offsets is None else offsets[lo:lo + chunk]))
                   for lo in range(0, len(data), chunk)]
        job = _StepJob(step, np.concatenate(rows), futures, where, offsets)
        if self.tokenizer is not None:  # here, in the reader thread, not in the consumer's next()
            job.text = self._text_of(step, job.rows)
        return job

    def _finish_step(self, job: _StepJob) -> Batch:
        source = self.source
        images = np.empty((self.local_batch,) + tuple(source.image_shape), np.uint8)
        labels = source.labels[job.rows].astype(np.int32)
        ids = np.asarray(job.rows, np.int64).copy()
        for lo, future in job.futures:
            out, failures = future.result()
            images[lo:lo + len(out)] = out
            for row, kind, problem in failures:
                images[lo + row], labels[lo + row], ids[lo + row] = self._replacement(job, lo + row, kind, problem)
        batch = {"image": images, "label": labels, "index": self.local_counters(job.step)}
        if job.text is None:
            return batch
        text, cut = job.text
        replaced = np.flatnonzero(ids != job.rows)
        if len(replaced):  # images replaced with on_error='skip' bring their own captions
            text, cut = text.copy(), cut.copy()
            text[replaced], cut[replaced] = self._text_of(job.step, ids[replaced])
        batch["text"], batch[CUT_FIELD] = text, cut
        return batch

    def _replacement(self, job: _StepJob, row: int, kind: str, problem: str):
        """on_error='skip': the next example of the row's shuffle block (cyclically) that decodes."""
        source = self.source
        source.record_bad(int(job.rows[row]), kind, problem)  # raises with on_error='fail'
        block, j = job.parts[row]
        offset = None if job.offsets is None else float(job.offsets[row])
        n = len(block.data)
        for k in range(1, n):
            c = (j + k) % n
            candidate = int(block.ids[c])
            if candidate in source.bad:
                continue
            image, kind, problem = source.decode_one(block.data[c], offset)
            if image is not None:
                return image, int(source.labels[candidate]), candidate
            source.record_bad(candidate, kind, problem)
        from clrjax.data.sources import DataError  # local: sources imports nothing of the pipeline
        raise DataError(f"{getattr(source.errors, 'name', 'the dataset')}: none of the {n} images of a shuffle "
                        f"block decode; check --config.dataset.path.")

    # -- iteration and state

    def state(self) -> Dict[str, int]:
        """{'step': the step of the next batch to be returned}; pass it back as start_step.

        Streaming sources add where that step's stream starts (informational: the step alone
        determines it): epoch, shuffle block, its first shard (index in dataset order) and the
        offset in it (samples), the examples of the block skipped, and the process count.
        """
        if self.plan is not None:
            return {"step": self._step, **self.plan.position(self._step, self.process_index)}
        return {"step": self._step}

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        if self._closed:
            raise RuntimeError("the loader is closed")
        if self.reader == "grain":
            batch = self._next_from_grain()
        elif self.reader == "stream" and self._prefetch_depth > 0:
            if self._stream is None:
                pool = self.source.pool()
                in_flight = -(-2 * pool.size * self._chunk(pool) // self.local_batch)
                self._stream = _StreamReader(self, self._step, max(self._prefetch_depth, in_flight))
            batch = self._stream.next_batch(self._step)
        elif self._prefetch_depth <= 0:
            batch = self._read_step(self._step)
        else:
            if self._prefetcher is None:
                self._prefetcher = _Prefetcher(self._read_step, self._step, self._prefetch_depth)
            batch = self._prefetcher.get(self._step)
        self._step += 1
        return self._yield(batch)

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
        return self._add_text(batch, self._step)

    def close(self) -> None:
        """Stops the prefetch/read threads; the loader cannot be iterated afterwards."""
        self._closed = True
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._sync_blocks is not None:
            self._sync_blocks.close()
            self._sync_blocks = None
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
