"""WebDataset tar shards: ``dataset.name = 'webdataset'`` (the layout img2dataset writes).

The user's guide is ``docs/OWN_DATA.md`` ("WebDataset tar shards"). Reading
is plain Python ``tarfile`` headers plus this project's decoders
(``clrjax/data/decoding.py``); the ``webdataset`` package is not needed.

Layout
------
``dataset.path`` names uncompressed tar shards: one path, a brace pattern
(``/data/shards-{00000..00099}.tar``, ``{a,b}``), a glob (``/data/*.tar``)
or a directory (its ``*.tar`` files); ``{split}`` is replaced by the split
name first. The shards are sorted by path. Inside a shard, consecutive files
sharing a key (the member name up to the first dot of its base name) are one
sample: ``key.jpg|jpeg|png|webp|bmp`` (the image; required), ``key.cls``
(its label: an integer, or a class name), ``key.txt`` (a caption; a JSON
list of strings is several; read by image-text training with
``dataset.caption_column = 'txt'``, which then requires a non-empty one per
sample) and ``key.json`` (metadata); other files are ignored.

Labels: ``.cls`` contents that are all non-negative integers are used as they
are (``num_classes`` = max + 1); otherwise they are class names, sorted (or in
``dataset.class_names`` order). Without any ``.cls`` the split is unlabelled
(every label 0, one class: pretraining only), as a flat image folder.

Splits: ``{split}`` in the path; else, when the path is a directory with a
sub-directory named like the split, that sub-directory; else
``dataset.split_fraction`` > 0 carves a stratified fraction of each class out
of the one set of shards (as ``image_folder``), which the training stream
then skips.

Index (read once at load)
-------------------------
Every shard's tar headers are read at load time (not the images: one 512-byte
header per file, plus the few bytes of each ``.cls``), in parallel threads,
and kept in memory (about 40 bytes per sample) for the process's life. The
count per shard is what lets every process yield the same number of batches
(:class:`clrjax.data.pipeline.ShardPlan`); the byte offsets are where a
resumed stream seeks to (shard and offset) and what evaluation reads in
order.

Reading
-------
Training streams (``TrainLoader`` reader 'stream', :mod:`clrjax.data.pipeline`):
each process reads runs of consecutive samples of its shards front to back
(:meth:`TarShardSource.read_raw`: a buffered sequential read, never a whole
shard in memory), shuffles them in blocks of ``dataset.shuffle_buffer``
samples and decodes in worker processes. ``source[indices]`` also reads any
sample by its offset (evaluation reads the test split in order this way).

Bad input (``dataset.on_error``, as ``clrjax/data/folders.py``)
---------------------------------------------------------------
'fail' (default) raises a one-line :class:`DataError` naming the shard (and
the member); 'skip' records it in ``source.errors`` and:

* a shard that cannot be opened or is not a tar file: left out;
* a shard cut short (it ends inside a member, or without the end-of-archive
  blocks): the complete samples before the cut are kept, except the last,
  whose other files may be what was lost;
* a sample without an image, or without a ``.cls`` where others have one: left out;
* an image that does not decode (corrupt, truncated): replaced by the next
  sample in the stream's block that decodes (by the next sample in dataset
  order through ``source[indices]``), so batches keep their size and stay a
  function of (seed, step).

Compressed shards (``.tar.gz`` and the like) are refused: they cannot be
indexed or resumed at an offset without decompressing them; ``gunzip`` them
(JPEG and PNG members do not compress anyway).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import re
import tarfile
import threading
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from clrjax.data import decoding
from clrjax.data.captions import parse_captions
from clrjax.data.datasets import Dataset
from clrjax.data.folders import (DEFAULT_DECODE_WORKERS, DEFAULTS, IMAGE_EXTENSIONS, ErrorLog, SPLIT_SEED,
                                 _get, _is_count)
from clrjax.data.sources import DataError, stratified_split

IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)  # jpg jpeg png webp bmp: the image member, in this preference
LABEL_EXT, TEXT_EXT = "cls", "txt"
COMPRESSED = (".gz", ".tgz", ".bz2", ".xz", ".zst", ".lz4")
DEFAULT_SHUFFLE_BUFFER = 4096
SCAN_THREADS = 8
READ_BUFFER = 1 << 20  # bytes per read of the sequential shard reader
_ZERO_BLOCK = bytes(tarfile.BLOCKSIZE)


# --------------------------------------------------------------------------- shard patterns


_RANGE = re.compile(r"\{(-?\d+)\.\.(-?\d+)\}")
_CHOICE = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> List[str]:
    """``a-{000..002}.tar`` -> ['a-000.tar', 'a-001.tar', 'a-002.tar']; ``{x,y}`` lists; leftmost first, nested."""
    found = [m for m in (_RANGE.search(pattern), _CHOICE.search(pattern)) if m]
    if not found:
        return [pattern]
    match = min(found, key=lambda m: m.start())
    head, tail = pattern[:match.start()], pattern[match.end():]
    if match.re is _RANGE:
        lo, hi = match.group(1), match.group(2)
        width = len(lo) if lo.startswith("0") and len(lo) > 1 else 0
        step = 1 if int(hi) >= int(lo) else -1
        values = [str(v).zfill(width) for v in range(int(lo), int(hi) + step, step)]
    else:
        values = match.group(1).split(",")
    return [p for v in values for p in expand_braces(head + v + tail)]


def expand_shards(pattern: str) -> List[str]:
    """The shard paths a ``dataset.path`` names (braces, then globs; a directory = its ``*.tar``), sorted.

    Paths named literally (no glob characters) are kept even when missing, so that loading
    reports them as unreadable instead of leaving them out silently.
    """
    out = []
    for path in expand_braces(os.path.expanduser(pattern)):
        if any(c in path for c in "*?["):
            out += [p for p in glob.glob(path) if os.path.isfile(p)]
        elif os.path.isdir(path):
            out += glob.glob(os.path.join(path, "*.tar"))
        else:
            out.append(path)
    return sorted(set(os.path.abspath(p) for p in out))


# --------------------------------------------------------------------------- the index of one shard


@dataclasses.dataclass
class ShardIndex:
    """One shard's samples as its tar headers give them (no image read).

    ``image``: int64 [n, 2] (byte offset, size) of each sample's image member; ``text``: the same
    for ``.txt`` (-1 = none); ``names``: the image member names; ``labels``: the ``.cls`` texts
    (None = no ``.cls``); ``problems``: bad input found while indexing, (kind, where, problem, fix),
    replayed into the ErrorLog of every source that reads the shard.
    """

    path: str
    names: List[str]
    image: np.ndarray
    text: np.ndarray
    labels: List[Optional[str]]
    problems: List[Tuple[str, str, str, str]]

    def __len__(self) -> int:
        return len(self.names)


_FIX_SHARD = "re-copy or re-create the shard"


def _split_name(name: str) -> Tuple[str, str]:
    """'dir/0001.seg.png' -> ('dir/0001', 'seg.png'): the key is everything up to the base name's first dot."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def scan_shard(path: str) -> Optional[ShardIndex]:
    """Reads one shard's headers (see :class:`ShardIndex`); None (with its problem) when it cannot be read.

    Never raises for bad input: the problems are returned, and the source decides (fail or skip).
    """
    problems: List[Tuple[str, str, str, str]] = []
    if path.lower().endswith(COMPRESSED):
        raise DataError(f"{path} is a compressed tar file; the webdataset reader needs uncompressed shards "
                        f"(it seeks to samples by offset): decompress them (e.g. gunzip) and point "
                        f"--config.dataset.path at the .tar files.")
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as err:
        problems.append(("unreadable", path, f"cannot be read ({decoding.describe(err)})",
                         "fix its permissions or leave it out of --config.dataset.path"))
        return ShardIndex(path, [], np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), [], problems)
    samples: List[Dict[str, Any]] = []
    truncated, drop_last = None, False
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError) as err:
            problems.append(("corrupt_shard", path, f"is not a tar file ({decoding.describe(err)})", _FIX_SHARD))
            return ShardIndex(path, [], np.zeros((0, 2), np.int64), np.zeros((0, 2), np.int64), [], problems)
        key = None
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError) as err:
                truncated = f"has a corrupt or cut tar header after {len(samples)} samples ({decoding.describe(err)})"
                drop_last = True
                break
            tar.members.clear()  # iterating only: do not keep every TarInfo
            if member is None:
                break
            if not member.isfile():
                continue
            if member.offset_data + member.size > size:
                truncated = (f"is cut short: it ends inside member {member.name!r} "
                             f"({max(0, size - member.offset_data)} of its {member.size} bytes are there)")
                drop_last = _split_name(member.name)[0] == key  # a sample cut in the middle is not kept
                break
            sample_key, ext = _split_name(member.name)
            if sample_key != key or not samples:
                key = sample_key
                samples.append({"key": key, "members": {}})
            members = samples[-1]["members"]
            if ext not in members:
                members[ext] = (member.offset_data, member.size, member.name)
            if ext == LABEL_EXT and member.size <= 4096:
                f.seek(member.offset_data)
                members["label"] = f.read(member.size).decode("utf-8", "replace").strip()
        if truncated is None:
            f.seek(tar.offset)
            block = f.read(tarfile.BLOCKSIZE)
            drop_last = True  # the last sample's other files may be what is missing
            if len(block) < tarfile.BLOCKSIZE:
                truncated = "is cut short: it ends without the tar end-of-archive blocks"
            elif block != _ZERO_BLOCK:
                truncated = f"has a corrupt tar header at byte {tar.offset}"
    if truncated is not None:
        kept = max(0, len(samples) - 1) if drop_last else len(samples)
        lost = " (the last one before the cut is not: its other files may be what was lost)" if drop_last else ""
        problems.append(("truncated", path, f"{truncated}; its first {kept} complete samples are read{lost}",
                         _FIX_SHARD))
        samples = samples[:kept]
    names, image, text, labels = [], [], [], []
    for sample in samples:
        members = sample["members"]
        ext = next((e for e in IMAGE_EXTS if e in members), None)
        if ext is None:
            listed = ", ".join(sorted(m[2] for k, m in members.items() if k != "label")) or "none"
            problems.append(("no_image", f"{path} sample {sample['key']!r}",
                             f"has no image ({'/'.join(IMAGE_EXTS)}) file (its files: {listed})",
                             "add the image or remove the sample's files"))
            continue
        offset, length, name = members[ext]
        names.append(name)
        image.append((offset, length))
        text.append(members[TEXT_EXT][:2] if TEXT_EXT in members else (-1, -1))
        labels.append(members.get("label"))
    return ShardIndex(path, names, np.asarray(image, np.int64).reshape(-1, 2),
                      np.asarray(text, np.int64).reshape(-1, 2), labels, problems)


_CACHE: Dict[Tuple[str, int, int], ShardIndex] = {}
_CACHE_LOCK = threading.Lock()


def index_shards(paths: Sequence[str], threads: int = SCAN_THREADS) -> List[ShardIndex]:
    """:func:`scan_shard` of every path, in parallel; cached per (path, size, mtime) for this process."""
    def one(path):
        try:
            stat = os.stat(path)
            cache_key = (path, stat.st_size, stat.st_mtime_ns)
        except OSError:
            return scan_shard(path)  # reports it as unreadable
        with _CACHE_LOCK:
            hit = _CACHE.get(cache_key)
        if hit is None:
            hit = scan_shard(path)
            with _CACHE_LOCK:
                _CACHE[cache_key] = hit
        return hit
    if len(paths) <= 1:
        return [one(p) for p in paths]
    with concurrent.futures.ThreadPoolExecutor(min(threads, len(paths)), "clrjax-tar-index") as pool:
        return list(pool.map(one, paths))


# --------------------------------------------------------------------------- the source


class TarShardSource:
    """A split of tar shards: streamed by the TrainLoader, random access for evaluation.

    Args:
      indexes: the :class:`ShardIndex` of each shard, in order.
      rows: per shard, the indices (into its index) of the samples of this split, in shard order.
      labels: per shard, int32 labels of those samples.
      num_classes, class_names, labelled: as :class:`clrjax.data.folders.ImageFileSource`.
      image_size, channels: host decode side (0 = native, then shared by all) and 1 or 3.
      errors: the split's :class:`ErrorLog`.
      processes, threads: decode worker processes (0 = ``threads`` threads in this process).
      shuffle_buffer: samples shuffled together by the training stream (its block size).
      host_crop: 'center' or 'random' (the training stream's square; evaluation always centres).
      has_captions: the ``.txt`` members are the captions (``dataset.caption_column = 'txt'``;
        every kept sample has a non-empty one): :meth:`captions_of`, and batches say which
        example each row holds (``'id'``), so a caption follows an image replaced with on_error='skip'.

    The streaming interface (:class:`clrjax.data.pipeline.TrainLoader` reader 'stream'):
    ``shard_sizes``, :meth:`read_raw`, :meth:`pool`, :meth:`record_bad`, ``bad``. An example's
    id (``source[id]``) is its position in dataset order: shards in order, samples in shard order.
    """

    streaming = True

    def __init__(self, indexes: Sequence[ShardIndex], rows: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 num_classes: int, class_names: Sequence[str], labelled: bool, image_size: int, channels: int,
                 errors: ErrorLog, processes: int = 0, threads: int = DEFAULT_DECODE_WORKERS,
                 shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER, host_crop: str = "center",
                 has_captions: bool = False):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        keep = [k for k in range(len(indexes)) if len(rows[k])]
        self._indexes = [indexes[k] for k in keep]
        self._rows = [np.asarray(rows[k], np.int64) for k in keep]
        self.shard_paths = [ix.path for ix in self._indexes]
        self.shard_sizes = np.asarray([len(r) for r in self._rows], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.shard_sizes)]).astype(np.int64)
        self.labels = (np.concatenate([np.asarray(labels[k], np.int32) for k in keep]) if keep
                       else np.zeros((0,), np.int32))
        self.num_classes, self.class_names, self.labelled = int(num_classes), tuple(class_names), bool(labelled)
        self.errors = errors
        self._size, self._channels = int(image_size), int(channels)
        self.processes, self.num_threads = max(0, int(processes)), max(1, int(threads))
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.host_crop = str(host_crop)
        self.has_captions = bool(has_captions)
        self.bad: set = set()  # ids found not to decode (recorded once)
        self._lock = threading.Lock()
        self._pool = None
        if not len(self):
            raise DataError(f"{errors.name}: no samples left to read; check --config.dataset.path.")
        self.image_shape = ((self._size, self._size, self._channels) if self._size else self._native_shape())

    # -- basics

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_skipped(self) -> int:
        """Bad inputs recorded so far (indexing and decoding) with on_error='skip'."""
        return self.errors.count

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def channels(self) -> int:
        return self._channels

    def locate(self, ids) -> Tuple[np.ndarray, np.ndarray]:
        """Dataset ids -> (shard, position among the shard's samples of this split)."""
        ids = np.asarray(ids, np.int64)
        shard = np.searchsorted(self._starts, ids, side="right") - 1
        return shard, ids - self._starts[shard]

    def where(self, example_id: int) -> str:
        """'<shard>:<image member>' of one example, for messages."""
        shard, pos = self.locate([example_id])
        index = self._indexes[int(shard[0])]
        return f"{index.path}:{index.names[int(self._rows[int(shard[0])][int(pos[0])])]}"

    def caption(self, example_id: int) -> Optional[str]:
        """The sample's ``.txt`` (None without one), read from its shard."""
        shard, pos = (int(v[0]) for v in self.locate([example_id]))
        offset, length = self._indexes[shard].text[self._rows[shard][pos]]
        if offset < 0:
            return None
        with open(self._indexes[shard].path, "rb") as f:
            f.seek(offset)
            return f.read(length).decode("utf-8", "replace")

    def captions_of(self, ids) -> List[List[str]]:
        """Every caption of each example ``ids``: its ``.txt`` member (a JSON list there is several).

        One ``pread`` per example (the member sits next to the image the stream just read). A
        ``.txt`` of whitespace only is bad input (the index saw its size, not its text): a
        DataError with on_error='fail', else recorded and used as the empty caption.
        """
        shards, positions = self.locate(np.asarray(ids, np.int64).reshape(-1))
        out: List[List[str]] = []
        fds: Dict[int, int] = {}
        try:
            for shard, pos in zip(shards.tolist(), positions.tolist()):
                index = self._indexes[shard]
                offset, length = index.text[self._rows[shard][pos]]
                if shard not in fds:
                    fds[shard] = os.open(index.path, os.O_RDONLY)
                text = os.pread(fds[shard], int(length), int(offset)).decode("utf-8", "replace") if offset >= 0 else ""
                captions = parse_captions(text)
                if not captions:
                    where = f"{index.path}:{index.names[self._rows[shard][pos]]}"
                    self.errors.bad("empty_caption", where, f"has an empty .{TEXT_EXT} caption",
                                    f"write the caption into its .{TEXT_EXT} member")
                    captions = [""]
                out.append(captions)
        except OSError as err:
            raise DataError(f"{self._indexes[shard].path}: cannot be read any more ({decoding.describe(err)}); it "
                            f"was readable when the run started: fix the file system or the shard.") from None
        finally:
            for fd in fds.values():
                os.close(fd)
        return out

    def _native_shape(self) -> Tuple[int, int, int]:
        from PIL import Image
        import io

        data = next(self.read_raw(0, 0, 1))[1]
        try:
            with Image.open(io.BytesIO(data)) as image:
                w, h = image.size
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{self.where(0)}: cannot be decoded as an image ({decoding.describe(err)}), and "
                            f"config.dataset.image_size is 0, which takes the size from the first image; set "
                            f"--config.dataset.image_size (e.g. 224) or replace the file.") from None
        return (h, w, self._channels)

    # -- reading

    def read_raw(self, shard: int, start: int, stop: int) -> Iterator[Tuple[int, bytes]]:
        """(id, image bytes) of this split's samples [start, stop) of ``shard``, read front to back.

        One buffered sequential read through the shard (``READ_BUFFER`` bytes at a time); the
        first sample is found by seeking to its offset (how a resumed stream starts mid-shard).
        """
        index, rows = self._indexes[shard], self._rows[shard][start:stop]
        first = int(self._starts[shard]) + int(start)
        try:
            with open(index.path, "rb", buffering=READ_BUFFER) as f:
                for k, row in enumerate(rows):
                    offset, length = index.image[row]
                    f.seek(int(offset))
                    data = f.read(int(length))
                    if len(data) != length:
                        raise DataError(f"{index.path}: member {index.names[row]!r} is cut short since the shard "
                                        f"was indexed ({len(data)} of {length} bytes); the shard changed during "
                                        f"the run: {_FIX_SHARD}.")
                    yield first + k, data
        except OSError as err:
            raise DataError(f"{index.path}: cannot be read any more ({decoding.describe(err)}); it was readable "
                            f"when the run started: fix the file system or the shard.") from None

    def read_ids(self, ids) -> List[bytes]:
        """Image bytes of any examples (random access, one ``pread`` each)."""
        shards, positions = self.locate(ids)
        out: List[bytes] = [b""] * len(shards)
        for shard in np.unique(shards):
            index, fd = self._indexes[int(shard)], None
            try:
                fd = os.open(index.path, os.O_RDONLY)
                for k in np.flatnonzero(shards == shard):
                    offset, length = index.image[self._rows[int(shard)][positions[k]]]
                    out[k] = os.pread(fd, int(length), int(offset))
            except OSError as err:
                raise DataError(f"{index.path}: cannot be read any more ({decoding.describe(err)}); it was readable "
                                f"when the run started: fix the file system or the shard.") from None
            finally:
                if fd is not None:
                    os.close(fd)
        return out

    def pool(self):
        """The decode pool (worker processes or threads), started on first use."""
        if self._pool is None:
            with self._lock:
                if self._pool is None:
                    self._pool = decoding.make_pool(self.processes, self.num_threads)
        return self._pool

    def record_bad(self, example_id: int, kind: str, problem: str) -> None:
        """An example that does not decode: DataError (on_error='fail') or recorded once (skip)."""
        if kind == "shape":
            raise DataError(f"{self.where(example_id)} decodes to {problem}, not {self.image_shape[1]}x"
                            f"{self.image_shape[0]}x{self.image_shape[2]} like the first image; set "
                            f"--config.dataset.image_size (e.g. 224 or 256).")
        with self._lock:  # recorded only once it is accepted: with 'fail' it raises every time
            if example_id in self.bad:
                return
            self.errors.bad("decode", self.where(example_id), f"cannot be decoded as an image ({problem})",
                            "replace the sample in its shard")
            self.bad.add(example_id)

    def decode_one(self, data: bytes, offset: Optional[float] = None) -> Tuple[Optional[np.ndarray], str, str]:
        """One image decoded in this thread: (image, '', '') or (None, kind, problem) as :func:`decode_chunk`."""
        out, failures = decoding.decode_chunk([data], self._size, self._channels, self.image_shape,
                                              None if offset is None else [offset])
        return (None, failures[0][1], failures[0][2]) if failures else (out[0], "", "")

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        scalar = np.ndim(index) == 0
        ids = np.asarray(index, np.int64).reshape(-1)
        datas = self.read_ids(ids)
        pool = self.pool()
        chunk = max(1, -(-len(ids) // (2 * pool.size)))
        jobs = [(lo, pool.submit(datas[lo:lo + chunk], self._size, self._channels, self.image_shape))
                for lo in range(0, len(ids), chunk)]
        images = np.empty((len(ids),) + tuple(self.image_shape), np.uint8)
        labels = self.labels[ids].astype(np.int32)
        used = ids.copy()
        for lo, job in jobs:
            out, failures = job.result()
            images[lo:lo + len(out)] = out
            for row, kind, problem in failures:
                images[lo + row], labels[lo + row], used[lo + row] = self._replacement_in_order(
                    int(ids[lo + row]), kind, problem)
        if scalar:
            return {"image": images[0], "label": labels[0]}
        batch = {"image": images, "label": labels}
        if self.has_captions:
            batch["id"] = used
        return batch

    def _replacement_in_order(self, example_id: int, kind: str, problem: str) -> Tuple[np.ndarray, int, int]:
        """on_error='skip': the next example in dataset order that decodes (random access)."""
        self.record_bad(example_id, kind, problem)
        n = len(self)
        for k in range(1, n):
            j = (example_id + k) % n
            if j in self.bad:
                continue
            image, kind, problem = self.decode_one(self.read_ids([j])[0])
            if image is not None:
                return image, int(self.labels[j]), j
            self.record_bad(j, kind, problem)
        raise DataError(f"{self.errors.name}: none of its {n} images can be decoded; check --config.dataset.path.")

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None


# --------------------------------------------------------------------------- splits, labels, loading


def _split_paths(cfg: Mapping[str, Any], split: str) -> Tuple[List[str], bool, str]:
    """(shard paths of ``split``, whether they are the split's own, the pattern) — False: carve by split_fraction."""
    pattern = os.path.expanduser(str(_get(cfg, "path", "")))
    if not pattern:
        raise DataError("config.dataset.path is empty; set --config.dataset.path to the tar shards "
                        "(a path, a {00000..00099} pattern, a glob or a directory).")
    if "{split}" in pattern:
        pattern = pattern.replace("{split}", split)
        return expand_shards(pattern), True, pattern
    if os.path.isdir(pattern) and os.path.isdir(os.path.join(pattern, split)):
        pattern = os.path.join(pattern, split)
        return expand_shards(pattern), True, pattern
    return expand_shards(pattern), False, pattern


def _label_kind(texts: Sequence[Optional[str]], cfg: Mapping[str, Any]) -> Tuple[Tuple[str, ...], bool, bool]:
    """(class names, integer labels, labelled) from the training split's ``.cls`` texts."""
    present = sorted({t for t in texts if t})
    if not present:
        return (), False, False
    given = tuple(str(n) for n in _get(cfg, "class_names", ()) or ())
    if given:
        return given, False, True
    if all(_is_count(t) for t in present):
        return (), True, True
    return tuple(present), False, True


class _Split:
    """A split's shards after indexing: per shard, the kept sample rows and their label texts."""

    def __init__(self, indexes: List[ShardIndex], pattern: str):
        self.indexes, self.pattern = indexes, pattern
        self.rows = [np.arange(len(ix), dtype=np.int64) for ix in indexes]

    def texts(self) -> List[Optional[str]]:
        return [ix.labels[r] for ix, rows in zip(self.indexes, self.rows) for r in rows]

    def select(self, keep: np.ndarray) -> None:
        """Keeps the samples whose flat position (over all shards) is in ``keep`` (sorted)."""
        keep = np.asarray(keep, np.int64)
        first = 0
        for k, rows in enumerate(self.rows):
            mine = keep[(keep >= first) & (keep < first + len(rows))] - first
            self.rows[k] = rows[mine]
            first += len(rows)


def _indexed(paths: List[str], pattern: str, errors: ErrorLog) -> _Split:
    if not paths:
        raise DataError(f"{pattern} matches no tar shard; point --config.dataset.path at the shards "
                        f"(a path, a {{00000..00099}} pattern, a glob or a directory of .tar files).")
    indexes = index_shards(paths)
    for ix in indexes:
        for kind, where, problem, fix in ix.problems:
            errors.bad(kind, where, problem, fix)  # raises with on_error='fail'
    return _Split(indexes, pattern)


def _parts(cfg: Mapping[str, Any], split: str, errors: ErrorLog) -> Tuple[_Split, _Split]:
    """(the split's shards and rows, the training split's shards and rows)."""
    train_split, test_split = str(_get(cfg, "train_split", "train")), str(_get(cfg, "test_split", "test"))
    paths, own, pattern = _split_paths(cfg, split)
    part = _indexed(paths, pattern, errors)
    if own:
        if split == train_split:
            return part, part
        train_paths, _, train_pattern = _split_paths(cfg, train_split)
        return part, _indexed(train_paths, train_pattern, ErrorLog("skip", f"(training split {train_pattern})"))
    fraction = float(_get(cfg, "split_fraction", 0.0))
    if split not in (train_split, test_split):
        raise DataError(f"{pattern} has no split {split!r} (no {{split}} in the path, no sub-directory of that "
                        f"name); one set of shards is divided into {train_split!r} and {test_split!r} by "
                        f"config.dataset.split_fraction.")
    if fraction <= 0:
        if split == train_split:
            return part, part
        raise DataError(f"{pattern} has no {split!r} shards ({{split}} in the path or a {split!r} sub-directory) "
                        f"and config.dataset.split_fraction is 0, so there is no {split!r} split; set "
                        f"--config.dataset.split_fraction (e.g. 0.1), or set --config.eval.final=False.")
    texts = part.texts()
    codes = np.unique(np.asarray([t or "" for t in texts], dtype=str), return_inverse=True)[1].reshape(-1)
    train_rows, test_rows = stratified_split(codes, fraction, SPLIT_SEED)
    train = _Split(part.indexes, pattern)
    train.select(train_rows)
    part.select(train_rows if split == train_split else test_rows)
    return part, train


def _labels(part: _Split, names: Tuple[str, ...], integer: bool, labelled: bool,
            errors: ErrorLog) -> List[np.ndarray]:
    """Label arrays per shard; samples without (or with an unknown) label are reported and left out."""
    index = {name: i for i, name in enumerate(names)}
    unknown: Dict[str, int] = {}
    out = []
    for k, (ix, rows) in enumerate(zip(part.indexes, part.rows)):
        keep, labels = [], []
        for r in rows:
            text = ix.labels[r]
            if not labelled:
                keep.append(r)
                labels.append(0)
            elif not text:
                errors.bad("missing_label", f"{ix.path}:{ix.names[r]}", f"has no .{LABEL_EXT} label file but "
                           f"other samples have one", f"add the sample's .{LABEL_EXT} file")
            elif integer and _is_count(text):
                keep.append(r)
                labels.append(int(text))
            elif integer:
                errors.bad("unknown_class", f"{ix.path}:{ix.names[r]}", f"has label {text!r} but the other "
                           f"labels are integers", "use integer labels throughout")
            elif text in index:
                keep.append(r)
                labels.append(index[text])
            else:
                unknown[text] = unknown.get(text, 0) + 1
        part.rows[k] = np.asarray(keep, np.int64)
        out.append(np.asarray(labels, np.int32))
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    for text, n in sorted(unknown.items()):
        errors.bad("unknown_class", f"{part.pattern} class {text!r}", f"labels {n} samples but is not a class of "
                   f"the training split ({shown})", "give both splits the same classes (or list it in "
                   "--config.dataset.class_names)")
    return out


def load_shards(cfg: Mapping[str, Any], split: str) -> TarShardSource:
    """The :class:`TarShardSource` of ``split`` (see the module docstring)."""
    on_error = str(_get(cfg, "on_error", "fail"))
    train_split = str(_get(cfg, "train_split", "train"))
    errors = ErrorLog(on_error, f"webdataset {_get(cfg, 'path', '')!r} split {split!r}")
    part, train = _parts(cfg, split, errors)
    names, integer, labelled = _label_kind(train.texts(), cfg)
    if split != train_split and not labelled:
        raise DataError(f"{part.pattern} is unlabelled (no .{LABEL_EXT} files in the training split), so split "
                        f"{split!r} cannot evaluate an encoder; add .{LABEL_EXT} files or set "
                        f"--config.eval.final=False.")
    captioned = _caption_column(cfg)
    if captioned:
        _require_captions(part, errors)
    labels = _labels(part, names, integer, labelled, errors)
    if not labelled:
        num_classes = 1
    elif integer:
        train_max = max((int(t) for t in train.texts() if t and _is_count(t)), default=0)
        num_classes = max([train_max] + [int(la.max()) for la in labels if len(la)]) + 1
    else:
        num_classes = len(names)
    if errors.count:
        logging.warning("%s: %d bad inputs skipped while indexing: %s", errors.name, errors.count,
                        dict(errors.by_kind))
    return TarShardSource(part.indexes, part.rows, labels, num_classes, names, labelled,
                          int(_get(cfg, "image_size", 0)), int(_get(cfg, "channels", 3)), errors,
                          processes=int(_get(cfg, "decode_processes", 0)),
                          threads=int(_get(cfg, "decode_workers", DEFAULT_DECODE_WORKERS)),
                          shuffle_buffer=int(_get(cfg, "shuffle_buffer", DEFAULT_SHUFFLE_BUFFER)),
                          host_crop=str(_get(cfg, "host_crop", "center")) if split == train_split else "center",
                          has_captions=captioned)


def _caption_column(cfg: Mapping[str, Any]) -> bool:
    """Whether ``dataset.caption_column`` asks for captions ('txt', the only caption member read)."""
    column = str(_get(cfg, "caption_column", ""))
    if column and column != TEXT_EXT:
        raise DataError(f"config.dataset.caption_column is {column!r} but webdataset captions are the "
                        f".{TEXT_EXT} members; set --config.dataset.caption_column={TEXT_EXT}.")
    return bool(column)


def _require_captions(part: _Split, errors: ErrorLog) -> None:
    """Samples without a ``.txt``, or with an empty one, are reported (and left out with on_error='skip')."""
    for k, (ix, rows) in enumerate(zip(part.indexes, part.rows)):
        keep = []
        for r in rows:
            offset, length = ix.text[r]
            if offset < 0 or length == 0:
                errors.bad("empty_caption" if offset >= 0 else "missing_caption", f"{ix.path}:{ix.names[r]}",
                           f"has {'an empty' if offset >= 0 else 'no'} .{TEXT_EXT} caption "
                           f"(config.dataset.caption_column={TEXT_EXT})",
                           f"add the sample's .{TEXT_EXT} file or set --config.dataset.caption_column=''")
            else:
                keep.append(r)
        part.rows[k] = np.asarray(keep, np.int64)


def _info(cfg: Mapping[str, Any]) -> Tuple[Tuple[int, int, int], int]:
    """Indexing only (plus one image header when image_size is 0)."""
    split = str(_get(cfg, "train_split", "train"))
    part, train = _parts(cfg, split, ErrorLog("skip", "(indexed for its shape)"))
    names, integer, labelled = _label_kind(train.texts(), cfg)
    if not labelled:
        num_classes = 1
    elif integer:
        num_classes = max(int(t) for t in train.texts() if t and _is_count(t)) + 1
    else:
        num_classes = len(names)
    size, channels = int(_get(cfg, "image_size", 0)), int(_get(cfg, "channels", 3))
    if size:
        return (size, size, channels), num_classes
    source = load_shards(dict(cfg, on_error="skip"), split)
    return tuple(source.image_shape), num_classes


def derived_fields(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """``{'class_names': (...)}`` as the training split's ``.cls`` files give them (recorded in config.json)."""
    _, train = _parts(cfg, str(_get(cfg, "train_split", "train")), ErrorLog("skip", "(indexed for its classes)"))
    return {"class_names": _label_kind(train.texts(), cfg)[0]}


DATASET = Dataset("webdataset", load_shards, _info, defaults=DEFAULTS, derive=derived_fields,
                  doc="your images in tar shards: dataset.path = shards-{00000..00099}.tar (key.jpg|png|webp + "
                      "key.cls)")
