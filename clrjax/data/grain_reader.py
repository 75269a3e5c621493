"""Reads :class:`clrjax.data.pipeline.TrainLoader`'s per-process index stream with grain.

Why grain: TFDS array_record data sources are grain's native input (a
``tfds.data_source`` is a grain ``RandomAccessDataSource``), and grain's
``MapDataset`` -> ``to_iter_dataset(ReadOptions)`` machinery reads and decodes
records in a thread pool, keeps a bounded read-ahead buffer across batch
boundaries (the old per-batch thread pool idled at the end of every batch),
and, with :class:`grain.experimental.ThreadPrefetchIterDataset`, builds whole
batches in the background. Grain also owns iterator shut-down and error
propagation from its worker threads.

What grain does *not* decide: the order. Grain's own samplers and
``MapDataset.shuffle`` would give a different (equally deterministic) order,
which would break the contract that checkpoints, the trainer's exact resume
and the device/process-count invariance rely on. So the index stream grain
reads is :class:`ContractOrder`, computed from the loader's own contract:

* position k of this process's stream (counted from ``start_step``) is step
  ``s = start_step + k // L`` and row ``r = k % L`` of this process's L = B/P
  rows; it reads dataset index ``loader.local_rows(s)[r]`` and carries the
  counter ``loader.local_counters(s)[r]`` (= s*B + p*L + r, int32-wrapped) as
  ``index``;
* batching k in groups of L therefore yields exactly ``loader.batch_at(s)``,
  the batch the direct (non-grain) path gives, for s = start_step, start_step+1, ...

The iterator's position is therefore a function of the step alone: resuming
at ``start_step`` builds the stream from that step, and grain's own iterator
state (``{'next_index': L * (step - start_step)}`` for the read stage) never
needs to be checkpointed.

Records are read through ``grain.MapDataset.source(source.data_source)`` and
decoded by ``source.decode`` when the source exposes both (``TfdsSource``:
the raw TFDS array_record data source and its decode/crop); any other source
is read element-wise through ``source[i]``.
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional

import numpy as np

import grain
from grain.experimental import ThreadPrefetchIterDataset

from clrjax.data.pipeline import has_record_source

# Length of the (infinite) stream as a grain MapDataset: a finite stand-in
# that no run reaches (2**62 examples).
_STREAM_LENGTH = min(sys.maxsize, 2**62)


class ContractOrder:
    """This process's index stream from ``start_step``: position k -> (dataset index, counter).

    The IndexSampler-equivalent that grain reads in place of its own samplers;
    ``loader`` provides ``local_batch``, ``local_rows(step)`` and
    ``local_counters(step)`` (see :class:`clrjax.data.pipeline.TrainLoader`).
    """

    def __init__(self, loader, start_step: int):
        self._loader = loader
        self._local = int(loader.local_batch)
        self._start = int(start_step)

    def __len__(self) -> int:
        return _STREAM_LENGTH

    def step_of(self, position: int) -> int:
        return self._start + position // self._local

    def __getitem__(self, position: int):
        step, row = divmod(int(position), self._local)
        step += self._start
        return int(self._loader.local_rows(step)[row]), self._loader.local_counters(step)[row]


class _ReadInOrder(grain.MapDataset):
    """Element k = record ``order[k]`` of ``records``, tagged with its counter.

    ``records`` is a grain MapDataset (``MapDataset.source(...)``); the read
    (and every ``.map`` after this) runs in grain's read threads.
    """

    def __init__(self, records: grain.MapDataset, order: ContractOrder):
        super().__init__(records)
        self._order = order

    def __len__(self) -> int:
        return len(self._order)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        row, counter = self._order[index]
        return self._parent[row], counter

    def __str__(self) -> str:
        return "ClrjaxContractOrder"


def _decoder(source) -> Callable[[Any], Dict[str, np.ndarray]]:
    """(record, counter) -> {'image': uint8 [H, W, C], 'label': int32 [], 'index': int32 []}."""
    if has_record_source(source):
        decode = source.decode

        def decode_record(element):
            record, counter = element
            image, label = decode(record)
            return {"image": image, "label": np.int32(label), "index": np.int32(counter)}
    else:
        def decode_record(element):  # ``source[i]`` already decoded the example
            example, counter = element
            return {"image": np.asarray(example["image"], np.uint8), "label": np.int32(example["label"]),
                    "index": np.int32(counter)}
    return decode_record


def build_stream(loader, start_step: int, read_threads: int = 8, read_ahead: Optional[int] = None,
                 batch_prefetch: int = 2) -> grain.IterDataset:
    """The grain pipeline yielding ``loader.batch_at(s)`` for s = start_step, start_step + 1, ...

    Args:
      loader: a :class:`clrjax.data.pipeline.TrainLoader` (its ``source`` and index contract).
      start_step: the first step yielded.
      read_threads: grain read/decode threads (``ReadOptions.num_threads``).
      read_ahead: examples read ahead of the consumer (``ReadOptions.prefetch_buffer_size``);
        default two local batches (at least ``read_threads``).
      batch_prefetch: whole batches built ahead in a background thread
        (``ThreadPrefetchIterDataset``); 0 = batches are stacked in the caller's thread.

    Returns:
      A ``grain.IterDataset`` of ``{'image': uint8 [L, H, W, C], 'label': int32 [L], 'index': int32 [L]}``.
    """
    source, local = loader.source, int(loader.local_batch)
    records = grain.MapDataset.source(source.data_source if has_record_source(source) else source)
    ds = _ReadInOrder(records, ContractOrder(loader, start_step)).map(_decoder(source))
    threads = max(0, int(read_threads))
    if read_ahead is None:
        read_ahead = max(2 * local, threads)
    read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=int(read_ahead) if threads else 0)
    batches = ds.to_iter_dataset(read_options).batch(local, drop_remainder=True)
    if batch_prefetch > 0:
        batches = ThreadPrefetchIterDataset(batches, prefetch_buffer_size=int(batch_prefetch))
    return batches
