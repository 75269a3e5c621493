"""Reads :class:`clrjax.data.pipeline.TrainLoader`'s per-process index stream with grain.

Why grain: TFDS array_record data sources are grain's native input (a
``tfds.data_source`` is a grain ``RandomAccessDataSource``), and grain's
``MapDataset`` -> ``to_iter_dataset(ReadOptions)`` machinery reads and decodes
in a thread pool with a bounded read-ahead buffer that spans batch boundaries
(the direct path's per-request pool idles at the end of every batch), and
:class:`grain.experimental.ThreadPrefetchIterDataset` assembles whole batches
in the background. Grain also owns iterator shut-down and the hand-off of
errors from its threads.

What grain does *not* decide is the order. Grain's samplers and
``MapDataset.shuffle`` would give a different (equally deterministic) order
and break the contract that checkpoints, the trainer's exact resume and the
device/process-count invariance rely on (see :mod:`clrjax.data.pipeline`).
Grain reads :class:`ContractOrder` instead, built from the loader's own
contract:

* this process's stream from ``start_step`` is the concatenation over
  s = start_step, start_step + 1, ... of ``loader.local_rows(s)`` (its rows
  [p*B/P, (p+1)*B/P) of global batch s), each carrying the counter
  ``loader.local_counters(s)`` (s*B + row, int32-wrapped) as ``index``;
* a grain element is a *chunk* of one step's rows (``read_chunk`` examples,
  default 32): grain's thread hand-off costs ~0.1 ms of CPU per element, as
  much as decoding a 32x32 PNG, so one element per example would halve the
  throughput of small images; the chunks of a step are concatenated back
  into the step's batch, which is therefore exactly ``loader.batch_at(s)``
  (the direct path's batch).

The iterator's position is a function of the step alone: resuming at
``start_step`` builds the stream from that step, so grain's own iterator
state never needs to be checkpointed; ``TrainLoader.state()`` stays
``{'step': s}``.

Records are read through ``grain.MapDataset.source(source.data_source)`` (batched: :class:`BatchedRecords`) and
decoded (and centre-cropped/resized) by ``source.decode`` when the source
exposes both (``TfdsSource``); any other source is read chunk-wise through
``source[rows]``. Threads, not grain's worker processes: the loader's index
contract and the tfds source are shared in memory, and PNG/JPEG decoding and
array_record reads release the GIL.
"""
from __future__ import annotations

import sys
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

import grain
from grain.experimental import ThreadPrefetchIterDataset

from clrjax.data.records import has_record_source

# Length of the (infinite) stream as a grain MapDataset: a finite stand-in
# that no run reaches.
_STREAM_LENGTH = min(sys.maxsize, 2**62)
# Examples per grain read unit (see build_stream): grain's thread hand-off
# costs ~0.1 ms of CPU per element, as much as decoding a 32x32 PNG, so an
# element is a chunk of a batch, not one example.
DEFAULT_READ_CHUNK = 32


class ContractOrder:
    """This process's index stream from ``start_step``, cut into read chunks.

    The IndexSampler-equivalent that grain reads in place of its own samplers.
    Chunk j is part q = j % K of step s = start_step + j // K, where the L = B/P
    local rows of a step are cut into K = ceil(L / chunk) contiguous parts
    [q*L//K, (q+1)*L//K). ``order[j]`` -> (dataset indices int64 [n], counters
    int32 [n]), taken from ``loader.local_rows(s)`` and ``loader.local_counters(s)``
    (see :class:`clrjax.data.pipeline.TrainLoader`).
    """

    def __init__(self, loader, start_step: int, chunk: int = DEFAULT_READ_CHUNK):
        self._loader = loader
        self.local_batch = int(loader.local_batch)
        self.chunks_per_step = -(-self.local_batch // max(1, min(int(chunk), self.local_batch)))
        self._start = int(start_step)

    def __len__(self) -> int:
        return _STREAM_LENGTH

    def __getitem__(self, position: int) -> Tuple[np.ndarray, np.ndarray]:
        step, part = divmod(int(position), self.chunks_per_step)
        step += self._start
        lo = part * self.local_batch // self.chunks_per_step
        hi = (part + 1) * self.local_batch // self.chunks_per_step
        return self._loader.local_rows(step)[lo:hi], self._loader.local_counters(step)[lo:hi]


class BatchedRecords:
    """A TFDS data source as a grain batched-read source (``_getitems``).

    ``grain.MapDataset.source`` reads a chunk through ``_getitems`` when the
    source has one: one array_record batched read (tfds' ``__getitems__``) and
    one grain metrics record per chunk instead of per example. On 32x32 PNGs
    that halves the CPU per example (read + decode ~80 us instead of ~150 us
    for ``data_source[i]`` one by one through grain's source dataset).
    """

    def __init__(self, data_source):
        self._ds = data_source

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, index):
        return self._ds[index]

    def _getitems(self, indices: Sequence[int]):
        getitems = getattr(self._ds, "__getitems__", None)
        return list(getitems(indices)) if getitems is not None else [self._ds[i] for i in indices]

    def __repr__(self) -> str:
        return f"BatchedRecords({self._ds!r})"


class _ReadChunks(grain.MapDataset):
    """Element j = chunk ``order[j]`` read from ``records`` and decoded.

    ``records`` is ``grain.MapDataset.source(BatchedRecords(data_source))``; element j is
    ``{'image': uint8 [n, H, W, C], 'label': int32 [n], 'index': int32 [n]}``.
    Grain calls ``__getitem__`` from its read threads, so reading and
    decoding run there.
    """

    def __init__(self, records: grain.MapDataset, order: ContractOrder, source):
        super().__init__(records)
        self._order = order
        self._image_shape = tuple(source.image_shape)
        self._decode = source.decode if has_record_source(source) else None
        self._source = source

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        rows, counters = self._order[index]
        if self._decode is None:  # an in-memory source: one fancy-indexing call
            example = self._source[rows]
            return {"image": np.asarray(example["image"], np.uint8), "label": np.asarray(example["label"], np.int32),
                    "index": counters}
        images = np.empty((len(rows),) + self._image_shape, np.uint8)
        labels = np.empty((len(rows),), np.int32)
        for i, record in enumerate(self._parent._getitems(rows.tolist())):  # pylint: disable=protected-access
            images[i], labels[i] = self._decode(record)
        return {"image": images, "label": labels, "index": counters}

    def __str__(self) -> str:
        return "ClrjaxReadChunks"


def _concatenate(chunks: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {key: np.concatenate([chunk[key] for chunk in chunks]) for key in chunks[0]}


def build_stream(loader, start_step: int, read_threads: int = 8, read_ahead: Optional[int] = None,
                 batch_prefetch: int = 2, read_chunk: int = DEFAULT_READ_CHUNK) -> grain.IterDataset:
    """The grain pipeline yielding ``loader.batch_at(s)`` for s = start_step, start_step + 1, ...

    ``MapDataset.source(data_source)`` -> :class:`_ReadChunks` (read + decode
    one chunk of :class:`ContractOrder`) -> ``to_iter_dataset(ReadOptions)``
    (chunks read by ``read_threads`` threads, in order) -> ``batch`` (the
    chunks of one step concatenated) -> ``ThreadPrefetchIterDataset``.

    Args:
      loader: a :class:`clrjax.data.pipeline.TrainLoader` (its ``source`` and index contract).
      start_step: the first step yielded.
      read_threads: grain read/decode threads (``ReadOptions.num_threads``); 0 = read in
        the consuming thread.
      read_ahead: examples read ahead of the consumer (``ReadOptions.prefetch_buffer_size``
        in chunks); default two local batches, and at least one chunk per thread.
      batch_prefetch: whole batches built ahead in a background thread
        (``ThreadPrefetchIterDataset``); 0 = batches are assembled in the caller's thread.
      read_chunk: examples per grain element (read unit).

    Returns:
      A ``grain.IterDataset`` of ``{'image': uint8 [L, H, W, C], 'label': int32 [L], 'index': int32 [L]}``.
    """
    source = loader.source
    order = ContractOrder(loader, start_step, read_chunk)
    chunk = -(-order.local_batch // order.chunks_per_step)
    records = grain.MapDataset.source(BatchedRecords(source.data_source) if has_record_source(source) else source)
    threads = max(0, int(read_threads))
    if read_ahead is None:
        read_ahead = 2 * order.local_batch
    buffer = max(-(-int(read_ahead) // chunk), threads) if threads else 0
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=buffer)
    batches = (_ReadChunks(records, order, source).to_iter_dataset(read_options)
               .batch(order.chunks_per_step, drop_remainder=True, batch_fn=_concatenate))
    if batch_prefetch > 0:
        batches = ThreadPrefetchIterDataset(batches, prefetch_buffer_size=int(batch_prefetch))
    return batches
