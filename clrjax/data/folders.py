"""Your own images: a folder of class sub-folders, a flat folder, or a CSV/TSV list.

Datasets ``image_folder``, ``csv`` and ``tsv`` (registered in
``clrjax/data/datasets.py``); the user's guide is ``docs/OWN_DATA.md``.
All read ``dataset.path`` and give a random-access :class:`ImageFileSource`
(the interface of ``clrjax/data/sources.py``), so the trainer's TrainLoader
shards, shuffles and resumes them like any built-in dataset (bit-exact: an
example is a function of its index).

Layouts
-------
* ``image_folder``: ``path/<class>/**/*.{jpg,jpeg,png,webp,bmp}``; labels are
  the indices of the sorted class-folder names (or of ``dataset.class_names``
  when given). A root without sub-folders is a *flat* folder: unlabelled, every
  label 0 and ``num_classes`` 1 (pretraining only; the online probe is then
  meaningless, and an evaluation split must be labelled). Files are visited
  in sorted (class, relative path) order; files without an image extension
  are ignored and counted in the log.
* ``csv`` / ``tsv``: a text file (comma / tab separated) whose header row
  names the columns ``path`` (required), ``label`` and ``caption``
  (optional; other columns are ignored). Paths are absolute or relative to
  the list file. Labels that are all non-negative integers are used as they
  are (``num_classes`` = max + 1); otherwise they are class names, sorted
  (or ordered by ``dataset.class_names``). Captions are kept on the source
  (``source.captions``); with ``dataset.caption_column`` (the column's name)
  they are what image-text training reads: every row needs one, rows naming
  the same image are one example with all their captions, and a JSON list in
  a cell is several (``source.captions_of``, ``clrjax/data/captions.py``).

Splits
------
``{split}`` in ``dataset.path`` is replaced by the split name
(``/data/list_{split}.csv``, ``/data/{split}``). Otherwise an image folder
with a sub-folder named like the split (``path/train``, ``path/test``) reads
it; else the split is drawn from the one root or list: a deterministic
stratified split (:func:`clrjax.data.sources.stratified_split`, seed 0) puts
``dataset.split_fraction`` of each class in ``dataset.test_split`` and the
rest in ``dataset.train_split``.

Decoding
--------
Pillow, on the host, in a thread pool of ``dataset.decode_workers`` threads
per request (Pillow releases the GIL while decoding and resizing). Each image
is converted to ``dataset.channels`` (1 = 'L', 3 = 'RGB'), and, when
``dataset.image_size`` S > 0, its centred square of the shorter side is
resized (bilinear, antialiased) to S x S; JPEGs are first decoded at the
smallest DCT scale that keeps the shorter side >= S (``Image.draft``).
``image_size`` 0 keeps the native size, which every image must share: all
headers are read at load time and different sizes are a :class:`DataError`
naming two of them.

Bad input (``dataset.on_error``)
--------------------------------
'fail' (default): the first bad input raises :class:`DataError`, one line
naming the file and the fix (``experiments/train.py`` exits with status 3).
'skip': it is recorded in the source's :class:`ErrorLog` (``source.errors``:
count, per-kind counts, the first files), logged as a warning, and:

* found while listing (a missing CSV path, an unreadable file, an empty class
  folder, a class in one split but not the other, an empty label cell): the
  file or class is left out of the split;
* found while decoding (a corrupt or truncated image): the example is replaced
  by the next example in dataset order that decodes, with that example's
  label, so batches keep their shape and stay a function of (seed, step).

``experiments/train.py`` prints the training split's count after the run and
writes ``<workdir>/data_errors.json``; ``source.num_skipped`` is the count.
"""
from __future__ import annotations

import collections
import concurrent.futures
import csv
import dataclasses
import json
import os
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

from clrjax.data import decoding
from clrjax.data.captions import parse_captions
from clrjax.data.datasets import Dataset
from clrjax.data.sources import DataError, stratified_split

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
ON_ERROR = ("fail", "skip")
SPLIT_SEED = 0
DEFAULT_DECODE_WORKERS = 8
ERROR_FILE = "data_errors.json"
_KEEP_FILES = 20  # files listed per error log (the count covers all)
_SKIP_HINT = "or set --config.dataset.on_error=skip to leave such input out and count it"


# --------------------------------------------------------------------------- bad input


class ErrorLog:
    """Bad input met by one source: raises (on_error='fail') or records it (on_error='skip').

    Thread-safe (decode threads record into it). ``count``: all records;
    ``by_kind``: counts per kind; ``files``: the first 20 (path, problem).
    """

    def __init__(self, on_error: str, name: str):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.on_error, self.name = on_error, name
        self.count = 0
        self.by_kind: Dict[str, int] = collections.Counter()
        self.files: List[Tuple[str, str]] = []
        self._lock = threading.Lock()

    def bad(self, kind: str, path: str, problem: str, fix: str) -> None:
        """Raises DataError('path: problem; fix, or ... skip') or records it and logs a warning."""
        if self.on_error == "fail":
            raise DataError(f"{path}: {problem}; {fix}, {_SKIP_HINT}.")
        with self._lock:
            self.count += 1
            self.by_kind[kind] += 1
            if len(self.files) < _KEEP_FILES:
                self.files.append((path, problem))
            n = self.count
        logging.warning("%s: skipped (%d so far) %s: %s", self.name, n, path, problem)

    def summary(self) -> dict:
        with self._lock:
            return {"dataset": self.name, "skipped": self.count, "by_kind": dict(self.by_kind),
                    "first_files": [{"path": p, "problem": q} for p, q in self.files]}


# --------------------------------------------------------------------------- decoding


def decode_image(path: str, size: int, channels: int, offset: Optional[float] = None) -> np.ndarray:
    """One image file -> uint8 [S, S, C] (size S > 0: centre square resized) or [H, W, C] (size 0).

    :func:`clrjax.data.decoding.decode_image` (simplejpeg for JPEGs where installed, else Pillow).
    Raises whatever the decoders or the file system raise; the source turns it into a DataError.
    """
    return decoding.decode_image(path, size, channels, offset)


def _header_size(path: str) -> Tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


_describe = decoding.describe


class ImageFileSource:
    """Random access over image files: ``source[indices] -> {'image', 'label'}``, decoded on request.

    Args:
      paths: image file paths (absolute), in dataset order.
      labels: int [N].
      num_classes: label count (1 for unlabelled data).
      image_size: host output side S; 0 = native (all images must share it: checked here).
      channels: 1 or 3.
      errors: the :class:`ErrorLog` (its ``on_error`` decides fail or skip).
      num_threads: decode threads per request.
      class_names: label -> name (empty when labels are plain integers or absent).
      captions: optional caption per example (CSV ``caption`` column).
      caption_lists: optional, every caption of each example (``dataset.caption_column``): what
        image-text training reads (:meth:`captions_of`); a batch then also holds ``'id'``, the
        example each row was read from (another one where an image was replaced, on_error='skip').
      labelled: False for a flat folder / a list without labels.
      processes: decode worker processes (:class:`clrjax.data.decoding.ProcessDecodePool`,
        started on first use); 0 = decode in ``num_threads`` threads of this process.
      host_crop: 'center' or 'random': what the TrainLoader asks for (:meth:`load` with
        ``offsets``); ``source[indices]`` (evaluation) always crops the centre.
    """

    def __init__(self, paths: Sequence[str], labels: np.ndarray, num_classes: int, image_size: int,
                 channels: int, errors: ErrorLog, num_threads: int = DEFAULT_DECODE_WORKERS,
                 class_names: Sequence[str] = (), captions: Optional[Sequence[str]] = None,
                 labelled: bool = True, processes: int = 0, host_crop: str = "center",
                 caption_lists: Optional[Sequence[Sequence[str]]] = None):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.paths = list(paths)
        self.labels = np.asarray(labels, np.int32).reshape(-1)
        self.num_classes = int(num_classes)
        self.class_names = tuple(class_names)
        self.captions = None if captions is None else list(captions)
        self.caption_lists = None if caption_lists is None else [list(c) for c in caption_lists]
        self.labelled = bool(labelled)
        self.errors = errors
        self._size, self._channels = int(image_size), int(channels)
        self._num_threads = max(1, int(num_threads))
        self._bad: set = set()
        self._lock = threading.Lock()
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self.processes = max(0, int(processes))
        self.host_crop = str(host_crop)
        self._process_pool: Optional[decoding.ProcessDecodePool] = None
        if not self.paths:
            raise DataError(f"{errors.name}: no images left to read; check --config.dataset.path.")
        if self._size:
            self.image_shape = (self._size, self._size, self._channels)
        else:
            self.image_shape = self._native_shape()

    @property
    def num_threads(self) -> int:
        return self._num_threads

    @property
    def has_captions(self) -> bool:
        return self.caption_lists is not None

    def captions_of(self, ids) -> List[List[str]]:
        """Every caption of each example ``ids`` (``clrjax/data/captions.py``)."""
        return [self.caption_lists[int(i)] for i in np.asarray(ids).reshape(-1)]

    @property
    def num_skipped(self) -> int:
        """Bad inputs recorded so far (listing and decoding) with on_error='skip'."""
        return self.errors.count

    @property
    def bad(self) -> set:
        """Ids of the examples found not to decode (each recorded once), as tar sources' ``bad``:
        what ``clrjax/data/counters.py`` unites over processes for ``data_skipped``."""
        return self._bad

    def __len__(self) -> int:
        return len(self.paths)

    def _map(self, fn, items):
        if len(items) > 1 and self._num_threads > 1:
            if self._pool is None:
                with self._lock:
                    if self._pool is None:
                        self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads, "clrjax-decode")
            return list(self._pool.map(fn, items))
        return [fn(i) for i in items]

    def _native_shape(self) -> Tuple[int, int, int]:
        """image_size 0: every header must give the same size (read in parallel, no decoding)."""
        def size_of(i):
            try:
                return _header_size(self.paths[i])
            except Exception as err:  # noqa: BLE001 - Pillow and the OS raise many types
                self._record_bad(i, err)
                return None
        sizes = self._map(size_of, list(range(len(self.paths))))
        first = next((i for i, s in enumerate(sizes) if s is not None), None)
        if first is None:
            raise DataError(f"{self.errors.name}: none of its {len(self.paths)} images can be read.")
        for i, s in enumerate(sizes):
            if s is not None and s != sizes[first]:
                raise DataError(
                    f"{self.paths[i]} is {s[0]}x{s[1]} but {self.paths[first]} is {sizes[first][0]}x"
                    f"{sizes[first][1]}, and config.dataset.image_size is 0 (keep the native size); set "
                    f"--config.dataset.image_size to the side to decode to (e.g. 224 or 256).")
        w, h = sizes[first]
        return (h, w, self._channels)

    def _record_bad(self, i: int, err) -> None:
        """Example i cannot be decoded (``err``: the exception or its description): raise or record it once."""
        text = err if isinstance(err, str) else _describe(err)
        with self._lock:  # recorded only once it is accepted: with 'fail' it raises every time
            if i in self._bad:
                return
            self.errors.bad("decode", self.paths[i], f"cannot be decoded as an image ({text})",
                            "replace or delete the file")
            self._bad.add(i)

    def _shape_error(self, i: int, shape) -> DataError:
        return DataError(f"{self.paths[i]} decodes to {shape[1]}x{shape[0]}, not "
                         f"{self.image_shape[1]}x{self.image_shape[0]} like the others; set "
                         f"--config.dataset.image_size (e.g. 224 or 256).")

    def _decode(self, i: int, offset: Optional[float] = None) -> np.ndarray:
        image = decode_image(self.paths[i], self._size, self._channels, offset)
        if image.shape != self.image_shape:
            raise self._shape_error(i, image.shape)
        return image

    def _load_one(self, i: int, offset: Optional[float] = None) -> Tuple[np.ndarray, int, int]:
        """(image, label, id) of example i, or (on_error='skip') of the next example in dataset order that decodes."""
        n = len(self.paths)
        for j in (i + k for k in range(n)):
            j %= n
            if j in self._bad:
                continue
            try:
                return self._decode(j, offset), int(self.labels[j]), j
            except DataError:
                raise
            except Exception as err:  # noqa: BLE001 - Pillow and the OS raise many types
                self._record_bad(j, err)  # raises with on_error='fail'
        raise DataError(f"{self.errors.name}: none of its {n} images can be decoded; check --config.dataset.path.")

    def __getitem__(self, index) -> Dict[str, np.ndarray]:
        return self.load(index)

    def load(self, index, offsets: Optional[Sequence[float]] = None) -> Dict[str, np.ndarray]:
        """``source[index]``, with the square cut at ``offsets`` (one in [0, 1] per row) instead of the centre."""
        if np.ndim(index) == 0:
            image, label, _ = self._load_one(int(index), None if offsets is None else float(np.ravel(offsets)[0]))
            return {"image": image, "label": np.int32(label)}
        index = np.asarray(index).reshape(-1)
        offsets = None if offsets is None else [float(o) for o in np.ravel(offsets)]
        if self.processes and len(index) > 1:
            return self._load_in_processes(index, offsets)
        rows = list(zip(index.tolist(), offsets if offsets is not None else [None] * len(index)))
        loaded = self._map(lambda row: self._load_one(*row), rows)
        images = np.empty((len(index),) + tuple(self.image_shape), np.uint8)
        for row, (image, _, _) in enumerate(loaded):
            images[row] = image
        out = {"image": images, "label": np.asarray([label for _, label, _ in loaded], np.int32)}
        return self._with_ids(out, [j for _, _, j in loaded])

    def _with_ids(self, batch: Dict[str, np.ndarray], ids) -> Dict[str, np.ndarray]:
        """Captioned sources say which example each row holds, so its caption follows a replaced image."""
        if self.caption_lists is not None:
            batch["id"] = np.asarray(ids, np.int64)
        return batch

    def _processes(self) -> decoding.ProcessDecodePool:
        if self._process_pool is None:
            with self._lock:
                if self._process_pool is None:
                    self._process_pool = decoding.ProcessDecodePool(self.processes)
        return self._process_pool

    def _load_in_processes(self, index: np.ndarray, offsets: Optional[List[float]]) -> Dict[str, np.ndarray]:
        """The rows decoded by the worker processes, two chunks per worker; bad ones resolved here."""
        pool = self._processes()
        n = len(index)
        chunk = max(1, -(-n // (2 * pool.size)))
        jobs = []
        for lo in range(0, n, chunk):
            rows = index[lo:lo + chunk]
            jobs.append((lo, rows, pool.submit([self.paths[i] for i in rows], self._size, self._channels,
                                               self.image_shape, None if offsets is None else offsets[lo:lo + chunk])))
        images = np.empty((n,) + tuple(self.image_shape), np.uint8)
        labels = self.labels[index].astype(np.int32)
        ids = index.astype(np.int64)
        for lo, rows, future in jobs:
            out, failures = future.result()
            images[lo:lo + len(rows)] = out
            for row, kind, text in failures:
                i = int(rows[row])
                if kind == "shape":
                    raise self._shape_error(i, tuple(int(v) for v in text.split("x"))[1::-1])
                self._record_bad(i, text)  # raises with on_error='fail'
                images[lo + row], labels[lo + row], ids[lo + row] = self._load_one(
                    i, None if offsets is None else offsets[lo + row])
        return self._with_ids({"image": images, "label": labels}, ids)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._process_pool is not None:
            self._process_pool.close()
            self._process_pool = None


# --------------------------------------------------------------------------- listings


@dataclasses.dataclass
class Listing:
    """One split's files before decoding: paths and their class keys (None = unlabelled)."""

    where: str                       # the root folder or list file, for messages
    paths: List[str]
    keys: Optional[List[str]]        # class folder name / label cell per file
    captions: Optional[List[str]] = None
    empty_classes: Tuple[str, ...] = ()  # class folders without images (already reported)
    caption_lists: Optional[List[List[str]]] = None  # dataset.caption_column: every caption per file

    def select(self, rows) -> "Listing":
        rows = list(rows)
        pick = lambda values: None if values is None else [values[r] for r in rows]  # noqa: E731
        return Listing(self.where, pick(self.paths), pick(self.keys), pick(self.captions), self.empty_classes,
                       pick(self.caption_lists))


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(top: str, errors: ErrorLog, ignored: List[str]) -> List[str]:
    """Image files under ``top`` (recursively), sorted by relative path; unreadable ones reported."""
    found = []
    def onerror(err):
        errors.bad("unreadable", getattr(err, "filename", None) or top,
                   f"cannot be listed ({_describe(err)})", "fix its permissions")
    for dirpath, dirnames, filenames in os.walk(top, onerror=onerror, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if not _is_image(name):
                ignored.append(path)
            elif not os.access(path, os.R_OK):
                errors.bad("unreadable", path, "cannot be read (missing target or no read permission)",
                           "fix or delete the file")
            else:
                found.append(path)
    return sorted(found, key=lambda p: os.path.relpath(p, top))


def list_folder(root: str, errors: ErrorLog) -> Listing:
    """``root/<class>/**/images`` (labelled) or images directly in ``root`` (flat, unlabelled)."""
    root = os.path.abspath(root)
    if not os.path.isdir(root):
        raise DataError(f"{root} is not a directory; point --config.dataset.path at the image folder.")
    try:
        entries = sorted(os.listdir(root))
    except OSError as err:
        raise DataError(f"{root} cannot be listed ({_describe(err)}); fix its permissions.") from None
    class_dirs = [e for e in entries if os.path.isdir(os.path.join(root, e)) and not e.startswith(".")]
    ignored: List[str] = []
    if not class_dirs:
        paths = _walk_images(root, errors, ignored)
        _log_ignored(root, ignored)
        return Listing(root, paths, None)
    loose = [e for e in entries if os.path.isfile(os.path.join(root, e)) and _is_image(e)]
    if loose:
        logging.warning("%s: %d image files directly in the root are not in a class folder and are not read "
                        "(e.g. %s).", root, len(loose), loose[0])
    paths, keys, empty = [], [], []
    for name in class_dirs:
        files = _walk_images(os.path.join(root, name), errors, ignored)
        if not files:
            errors.bad("empty_class", os.path.join(root, name),
                       f"is an empty class folder (no {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files)",
                       "add images or remove the folder")
            empty.append(name)
        paths += files
        keys += [name] * len(files)
    _log_ignored(root, ignored)
    return Listing(root, paths, keys, empty_classes=tuple(empty))


def _log_ignored(root: str, ignored: List[str]) -> None:
    if ignored:
        logging.info("%s: ignored %d files without an image extension %s (e.g. %s).", root, len(ignored),
                     IMAGE_EXTENSIONS, ignored[0])


def list_table(path: str, delimiter: str, errors: ErrorLog, caption_column: str = "") -> Listing:
    """A CSV/TSV list: header row with ``path`` and optional ``label`` / ``caption`` columns.

    With ``caption_column`` (``dataset.caption_column``) that column must exist and every row
    needs a caption (a JSON list in the cell is several); rows naming the same image are one
    example with all their captions (:func:`merge_captioned_rows`).
    """
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            columns = reader.fieldnames or []
            if "path" not in columns:
                kind = "tab" if delimiter == "\t" else "comma"
                raise DataError(f"{path}: the header row names the columns {columns} but no 'path' column; "
                                f"the first line must be {kind}-separated column names with 'path' and "
                                f"optionally 'label' and 'caption' (see docs/OWN_DATA.md).")
            if caption_column and caption_column not in columns:
                raise DataError(f"{path}: the header row names the columns {columns} but not "
                                f"config.dataset.caption_column={caption_column!r}; name the caption column "
                                f"there, or set --config.dataset.caption_column to one of those columns.")
            caption_key = caption_column or "caption"
            labelled, captioned = "label" in columns, caption_key in columns
            base = os.path.dirname(os.path.abspath(path))
            paths, keys, captions = [], [], []
            for row in reader:
                where = f"{path} line {reader.line_num}"
                cell = (row.get("path") or "").strip()
                if not cell:
                    errors.bad("missing_path", where, "has no image path", "fill in the path column")
                    continue
                image = os.path.normpath(cell if os.path.isabs(cell) else os.path.join(base, cell))
                if not os.path.isfile(image):
                    errors.bad("missing_path", where, f"names {cell!r}, and {image} does not exist",
                               "fix the path (relative paths are relative to the list file)")
                    continue
                label = (row.get("label") or "").strip() if labelled else None
                if labelled and not label:
                    errors.bad("missing_label", where, f"has no label for {cell!r}", "fill in the label column")
                    continue
                caption = row.get(caption_key) or ""
                if caption_column and not parse_captions(caption):
                    errors.bad("empty_caption", where, f"has an empty {caption_column!r} caption for {cell!r}",
                               "write the caption")
                    continue
                paths.append(image)
                keys.append(label)
                captions.append(caption)
    except OSError as err:
        raise DataError(f"{path} cannot be read ({_describe(err)}); point --config.dataset.path at the "
                        f"list file.") from None
    except csv.Error as err:
        raise DataError(f"{path}: malformed list file ({_describe(err)}); fix the file.") from None
    listing = Listing(path, paths, keys if labelled else None, captions if captioned else None)
    return merge_captioned_rows(listing) if caption_column else listing


def merge_captioned_rows(listing: Listing) -> Listing:
    """Rows naming the same image -> one example (at its first row, with that row's label) and all captions."""
    first: Dict[str, int] = {}
    lists: List[List[str]] = []
    keep: List[int] = []
    for r, (path, caption) in enumerate(zip(listing.paths, listing.captions)):
        if path not in first:
            first[path] = len(keep)
            keep.append(r)
            lists.append([])
        lists[first[path]] += parse_captions(caption)
    merged = listing.select(keep)
    merged.caption_lists = lists
    return merged


# --------------------------------------------------------------------------- splits and labels


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _split_location(cfg: Mapping[str, Any], split: str, kind: str) -> Tuple[str, bool]:
    """(root or file of ``split``, whether it is its own location) — False means carve it by split_fraction."""
    path = os.path.expanduser(str(_get(cfg, "path", "")))
    if not path:
        raise DataError(f"config.dataset.path is empty; set --config.dataset.path to the image "
                        f"{'folder' if kind == 'image_folder' else 'list file'}.")
    if "{split}" in path:
        return path.replace("{split}", split), True
    if kind == "image_folder" and os.path.isdir(os.path.join(path, split)):
        return os.path.join(path, split), True
    return path, False


def _list(location: str, kind: str, errors: ErrorLog, caption_column: str = "") -> Listing:
    if kind == "image_folder":
        return list_folder(location, errors)
    if not os.path.isfile(location):
        raise DataError(f"{location} does not exist; point --config.dataset.path at the list file "
                        f"(with {{split}} in it for one file per split).")
    return list_table(location, "\t" if kind == "tsv" else ",", errors, caption_column)


def _is_count(key: str) -> bool:
    return key.isdigit()


def class_names_of(cfg: Mapping[str, Any], listing: Listing, kind: str) -> Tuple[Tuple[str, ...], bool]:
    """(class names in label order, whether labels are plain integers) from the listing the names come from."""
    if listing.keys is None:
        return (), False
    given = tuple(str(n) for n in _get(cfg, "class_names", ()) or ())
    if given:
        return given, False
    present = sorted(set(listing.keys))
    if kind != "image_folder" and present and all(_is_count(k) for k in present):
        return (), True
    return tuple(present), False


def _label_array(listing: Listing, names: Tuple[str, ...], integer: bool,
                 errors: ErrorLog) -> Tuple[Listing, np.ndarray]:
    """Labels of ``listing``'s files; files of an unknown class are reported (and left out with skip)."""
    if listing.keys is None:
        return listing, np.zeros(len(listing.paths), np.int32)
    if integer:
        keep = []
        for r, k in enumerate(listing.keys):
            if _is_count(k):
                keep.append(r)
            else:
                errors.bad("unknown_class", listing.paths[r], f"has label {k!r} but the other labels are integers",
                           "use integer labels throughout")
        listing = listing.select(keep)
        return listing, np.asarray([int(k) for k in listing.keys], np.int32)
    index = {name: i for i, name in enumerate(names)}
    keep, unknown = [], collections.Counter()
    for r, k in enumerate(listing.keys):
        if k in index:
            keep.append(r)
        else:
            unknown[k] += 1
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    for k, n in sorted(unknown.items()):
        errors.bad("unknown_class", f"{listing.where} class {k!r}",
                   f"holds {n} images but is not a class of the training split ({shown})",
                   "give both splits the same classes (or list it in --config.dataset.class_names)")
    listing = listing.select(keep)
    return listing, np.asarray([index[k] for k in listing.keys], np.int32)


def _check_classes_present(train: Listing, test: Listing, errors: ErrorLog, test_split: str) -> None:
    """Every class with training images must have images in the evaluation split."""
    if train.keys is None or test.keys is None:
        return
    present = set(test.keys)
    for name in sorted(set(train.keys)):
        if name not in present:
            errors.bad("missing_class", f"{test.where} class {name!r}",
                       f"has images in the training split but none in split {test_split!r}",
                       "add images of that class to the evaluation split")


def _fraction_rows(listing: Listing, cfg: Mapping[str, Any], split: str, train_split: str,
                   test_split: str) -> Optional[np.ndarray]:
    """Rows of ``split`` carved from one root/list by split_fraction; None = all rows (no split)."""
    fraction = float(_get(cfg, "split_fraction", 0.0))
    if split not in (train_split, test_split):
        raise DataError(f"{listing.where} has no split {split!r} (no sub-folder or {{split}} file of that name); "
                        f"one root is divided into {train_split!r} and {test_split!r} by "
                        f"config.dataset.split_fraction.")
    if fraction <= 0:
        if split == train_split:
            return None
        raise DataError(f"{listing.where} has no {split!r} sub-folder and config.dataset.split_fraction is 0, so "
                        f"there is no {split!r} split; set --config.dataset.split_fraction (e.g. 0.1), add "
                        f"a {split!r} sub-folder, or set --config.eval.final=False.")
    keys = listing.keys if listing.keys is not None else [""] * len(listing.paths)
    codes = np.unique(np.asarray(keys, dtype=str), return_inverse=True)[1].reshape(-1)
    train_rows, test_rows = stratified_split(codes, fraction, SPLIT_SEED)
    return train_rows if split == train_split else test_rows


def _parts(cfg: Mapping[str, Any], split: str, kind: str, errors: ErrorLog) -> Tuple[Listing, Listing, Listing]:
    """(the split's listing, the training split's listing, the listing the class names come from)."""
    train_split, test_split = str(_get(cfg, "train_split", "train")), str(_get(cfg, "test_split", "test"))
    location, own = _split_location(cfg, split, kind)
    caption_column = str(_get(cfg, "caption_column", ""))
    listing = _list(location, kind, errors, caption_column)
    if own:
        if split == train_split:
            return listing, listing, listing
        train_location, _ = _split_location(cfg, train_split, kind)
        train = _list(train_location, kind, ErrorLog("skip", f"(training split {train_location}, listed for its classes)"),
                      caption_column)
        return listing, train, train
    rows = _fraction_rows(listing, cfg, split, train_split, test_split)
    train_rows = _fraction_rows(listing, cfg, train_split, train_split, test_split)
    part = listing if rows is None else listing.select(rows)
    train = listing if train_rows is None else listing.select(train_rows)
    return part, train, listing


def _has_split(cfg: Mapping[str, Any], split: str, kind: str) -> bool:
    location, own = _split_location(cfg, split, kind)
    return os.path.exists(location) if own else float(_get(cfg, "split_fraction", 0.0)) > 0


def load_files(cfg: Mapping[str, Any], split: str, kind: str) -> ImageFileSource:
    """The source of ``split`` for dataset kind 'image_folder', 'csv' or 'tsv' (see the module docstring)."""
    on_error = str(_get(cfg, "on_error", "fail"))
    train_split, test_split = str(_get(cfg, "train_split", "train")), str(_get(cfg, "test_split", "test"))
    errors = ErrorLog(on_error, f"{kind} {_get(cfg, 'path', '')!r} split {split!r}")
    listing, train, names_from = _parts(cfg, split, kind, errors)
    names, integer = class_names_of(cfg, names_from, kind)
    if split == train_split and on_error == "fail" and test_split != train_split and _has_split(cfg, test_split, kind):
        # Fail before training, not at the final evaluation, when the evaluation split lacks a class.
        test, _, _ = _parts(cfg, test_split, kind, ErrorLog("skip", "(evaluation split, listed for its classes)"))
        _check_classes_present(train, test, errors, test_split)
    if split != train_split:
        if listing.keys is None:
            what = "no class sub-folders" if kind == "image_folder" else "no label column"
            raise DataError(f"{listing.where} is unlabelled ({what}), so split {split!r} cannot evaluate an "
                            f"encoder; give it labels or set --config.eval.final=False.")
        _check_classes_present(train, listing, errors, split)
    listing, labels = _label_array(listing, names, integer, errors)
    if listing.keys is None:
        num_classes = 1
    elif integer:
        train_max = max((int(k) for k in train.keys if _is_count(k)), default=0)
        num_classes = max(train_max, int(labels.max()) if len(labels) else 0) + 1
    else:
        num_classes = len(names)
    if errors.count:
        logging.warning("%s: %d bad inputs skipped while listing: %s", errors.name, errors.count,
                        dict(errors.by_kind))
    return ImageFileSource(listing.paths, labels, num_classes, int(_get(cfg, "image_size", 0)),
                           int(_get(cfg, "channels", 3)), errors,
                           int(_get(cfg, "decode_workers", DEFAULT_DECODE_WORKERS)), class_names=names,
                           captions=listing.captions, labelled=listing.keys is not None,
                           processes=int(_get(cfg, "decode_processes", 0)),
                           host_crop=str(_get(cfg, "host_crop", "center")) if split == train_split else "center",
                           caption_lists=listing.caption_lists)


def derived_fields(cfg: Mapping[str, Any], kind: str) -> Dict[str, Any]:
    """``{'class_names': (...)}`` as the training split's listing gives them (recorded in config.json)."""
    _, _, names_from = _parts(cfg, str(_get(cfg, "train_split", "train")), kind,
                              ErrorLog("skip", "(listed for its class names)"))
    return {"class_names": class_names_of(cfg, names_from, kind)[0]}


def _info(cfg: Mapping[str, Any], kind: str) -> Tuple[Tuple[int, int, int], int]:
    """Listing only (plus one header when image_size is 0): no image is decoded."""
    split = str(_get(cfg, "train_split", "train"))
    listing, train, names_from = _parts(cfg, split, kind, ErrorLog("skip", "(listed for its shape)"))
    names, integer = class_names_of(cfg, names_from, kind)
    if listing.keys is None:
        num_classes = 1
    elif integer:
        num_classes = max(int(k) for k in listing.keys if _is_count(k)) + 1
    else:
        num_classes = len(names)
    channels, size = int(_get(cfg, "channels", 3)), int(_get(cfg, "image_size", 0))
    if size:
        return (size, size, channels), num_classes
    if not listing.paths:
        raise DataError(f"{listing.where} holds no images; check --config.dataset.path.")
    w, h = _header_size(listing.paths[0])
    return (h, w, channels), num_classes


def write_error_report(source, workdir: str) -> Optional[str]:
    """``workdir/data_errors.json`` with the source's skipped inputs, when it has any; returns its path."""
    errors = getattr(source, "errors", None)
    if errors is None or not errors.count:
        return None
    from clrjax import metrics as metrics_lib, storage  # a gs:// workdir is written through storage
    path = storage.join(workdir, ERROR_FILE)
    metrics_lib.write_text_atomically(path, json.dumps(errors.summary(), indent=1))
    return path


# Config defaults of these datasets (configs/<method>.py:image_folder): photographs, as ImageNet.
DEFAULTS = {"dataset.image_size": 256,            # host decode side; the device crops 224 from it
            "dataset.decode_processes": 8,         # decode worker processes (BENCHMARKS.md: ~5 cores per 2,500 JPEG/s)
            "augment.crop_size": 224,
            "augment.mean": (0.485, 0.456, 0.406),  # ImageNet statistics: measure your own images'
            "augment.std": (0.229, 0.224, 0.225)}


def _entry(kind: str, doc: str) -> Dataset:
    return Dataset(kind, lambda cfg, split: load_files(cfg, split, kind), lambda cfg: _info(cfg, kind),
                   defaults=DEFAULTS, doc=doc,
                   derive=lambda cfg: derived_fields(cfg, kind))


IMAGE_FOLDER = _entry("image_folder", "your images: dataset.path/<class>/*.jpg|png|webp (or a flat folder)")
CSV = _entry("csv", "your images listed in a CSV file (columns path[,label][,caption])")
TSV = _entry("tsv", "your images listed in a TSV file (columns path[,label][,caption])")
