"""The data counters of ``metrics.jsonl``, over all processes: ``captions_cut`` and ``data_skipped``.

Each process reads only its own rows, so each only knows what it read; the trainer logs what the
run as a whole met. At a logging step every process hands its :class:`Snapshot` to an all-gather
(``jax.experimental.multihost_utils.process_allgather``, only when there are several processes)
and :func:`combine` makes the run's values:

* ``captions_cut`` (image-text data): captions cut to ``text.context_length`` in the global
  batches of steps ``[0, s)``, s the row's step. Cumulative over resumes: the sum over processes
  of ``TrainLoader.captions_cut`` (counted as batches are yielded to the step, not when they are
  read ahead), plus the count of the checkpoint the run resumed from (its meta's ``captions_cut``).
  A checkpoint written before this field existed resumes from 0.
* ``data_skipped`` (datasets with a bad-input log: csv, tsv, image_folder, webdataset): bad inputs
  found so far. Those found while listing (a missing image file in a list, an empty caption, ...)
  are the same on every process (each lists the whole split), so they count once; those found
  while decoding are the union of the processes' ``source.bad`` example ids (a file met by two
  processes in different epochs counts once). Decoding runs ahead of the step (prefetch), so
  a row may count a file of a batch not trained yet. Not restored on resume: a resumed run
  counts a bad file again when it meets it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

CHECKPOINT_KEY = "captions_cut"  # in the checkpoint meta: the global count at the saved step
_LOW = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """What one process has counted (``None``: the run has no such counter)."""

    captions_cut: Optional[int]       # captions cut in the batches this process's loader yielded
    listed: Optional[int]             # bad inputs found while listing the split
    bad: np.ndarray                   # int64 [n]: example ids found not to decode


def snapshot(source, loader) -> Snapshot:
    """This process's counts now."""
    cut = int(loader.captions_cut) if getattr(loader, "tokenizer", None) is not None else None
    errors = getattr(source, "errors", None)
    if errors is None or not hasattr(source, "num_skipped"):
        return Snapshot(cut, None, np.zeros((0,), np.int64))
    # set.copy() holds the GIL throughout: a decode thread cannot add to the set while it is copied.
    bad = np.asarray(sorted(getattr(source, "bad", set()).copy()), np.int64)
    summary = errors.summary()  # count and per-kind counts read together (the log's lock)
    return Snapshot(cut, int(summary["skipped"]) - int(summary["by_kind"].get("decode", 0)), bad)


def combine(snapshots: Sequence[Snapshot], captions_cut_before: int = 0) -> Dict[str, int]:
    """The run's values from every process's snapshot (process order; module docstring)."""
    first = snapshots[0]
    out = {}
    if first.captions_cut is not None:
        out["captions_cut"] = int(captions_cut_before) + sum(int(s.captions_cut) for s in snapshots)
    if first.listed is not None:
        found = set()
        for s in snapshots:
            found.update(int(i) for i in s.bad)
        out["data_skipped"] = int(first.listed) + len(found)
    return out


def _pairs(values) -> np.ndarray:
    """int64 -> int32 [..., 2] (high, low 31 bits): the all-gather carries int32 (jax without x64)."""
    values = np.asarray(values, np.int64)
    return np.stack([values >> 31, values & _LOW], -1).astype(np.int32)


def _unpairs(pairs) -> np.ndarray:
    pairs = np.asarray(pairs)
    return (pairs[..., 0].astype(np.int64) << 31) | pairs[..., 1].astype(np.int64)


def _process_allgather(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils  # local: the data package does not need jax

    return np.asarray(multihost_utils.process_allgather(x))


def gather(snap: Snapshot, allgather: Callable[[np.ndarray], np.ndarray] = _process_allgather) -> List[Snapshot]:
    """Every process's snapshot, in process order. A collective: every process must call it.

    ``allgather(x)``: x, the same shape on every process, stacked over processes ([P, ...]).
    Two rounds: the counts and the number of bad ids, then the ids padded with -1 to the longest
    (rounded up to a power of two, so that the gather is compiled again only as the set doubles).
    """
    head = _pairs([-1 if snap.captions_cut is None else snap.captions_cut,
                   -1 if snap.listed is None else snap.listed, len(snap.bad)])
    heads = _unpairs(allgather(head))                      # [P, 3]
    width = 1 << max(0, int(heads[:, 2].max()) - 1).bit_length()
    ids = np.full((width,), -1, np.int64)
    ids[:len(snap.bad)] = snap.bad
    all_ids = _unpairs(allgather(_pairs(ids)))             # [P, width]
    return [Snapshot(None if cut < 0 else int(cut), None if listed < 0 else int(listed), row[:n])
            for (cut, listed, n), row in zip(heads.tolist(), all_ids)]


class DataCounters:
    """The trainer's counters of one invocation: ``values()`` for a metrics row, ``for_checkpoint()`` for meta.

    ``process_count`` > 1 gathers over processes (a collective: every process calls these at the
    same steps); the last gather is reused while the loader has not moved (a step both logged and saved).
    """

    def __init__(self, source, loader, captions_cut_before: int = 0, process_count: int = 1,
                 allgather: Callable[[np.ndarray], np.ndarray] = _process_allgather):
        self._source, self._loader = source, loader
        self._before = int(captions_cut_before)
        self._process_count, self._allgather = int(process_count), allgather
        self._cached = None  # (loader step, values)

    def values(self) -> Dict[str, int]:
        step = int(self._loader.state()["step"])
        if self._cached is not None and self._cached[0] == step:
            return dict(self._cached[1])
        snap = snapshot(self._source, self._loader)
        everyone = gather(snap, self._allgather) if self._process_count > 1 else [snap]
        values = combine(everyone, self._before)
        self._cached = (step, values)
        return dict(values)

    def for_checkpoint(self) -> Dict[str, int]:
        """``{'captions_cut': the global count at this step}`` (image-text data), else {}."""
        values = self.values()
        return {CHECKPOINT_KEY: values["captions_cut"]} if "captions_cut" in values else {}


def restored_captions_cut(meta: dict) -> int:
    """The count a resumed run starts from: the checkpoint meta's (0 for a checkpoint without it)."""
    return int(meta.get(CHECKPOINT_KEY, 0))
