"""Random-access image sources: in-memory arrays, IDX files, synthetic, TFDS.

Every source has the same small interface, which is all the pipeline needs:

* ``len(source)`` -> number of examples N,
* ``source[indices]`` with an integer array of shape [k] ->
  ``{'image': uint8 [k, H, W, C], 'label': int32 [k]}`` in the order of
  ``indices`` (an ``int`` index gives one example without the leading axis),
* ``source.image_shape`` -> (H, W, C) and ``source.num_classes``.

Images stay uint8 on the host; conversion to float, augmentation and
normalisation happen on the device (``clrjax.data.augment``). Images of
variable size (ImageNet, Imagenette) are decoded and centre-cropped/resized to
one fixed size on the host, because a device batch needs one shape.

Built-in datasets (registered in ``clrjax/data/datasets.py``; each entry is defined at the end of this file):

=============  =====================================================  ==========
name           source                                                 shape
=============  =====================================================  ==========
digits         ``sklearn.datasets.load_digits`` (in the wheel), 1,797  8x8x1
               images; fixed stratified 80/20 train/test split
fashion_mnist  four IDX ``.gz`` files (Xiao et al. 2017) in data_dir   28x28x1
synthetic      deterministic random pixels, for benchmarks             SxSxC
cifar10/100    TFDS ``cifar10`` / ``cifar100`` (array_record)          32x32x3
stl10          TFDS ``stl10``                                          96x96x3
imagenette     TFDS ``imagenette/320px-v2``, host resize+centre crop   SxSx3
imagenet2012   TFDS ``imagenet2012``, host resize+centre crop          SxSx3
=============  =====================================================  ==========

TFDS datasets are read with ``tfds.data_source(..., download=False)``, which
needs no TensorFlow. They must be prepared beforehand with
``tfds build NAME --data_dir=DIR --file_format=array_record`` (building image
datasets needs TensorFlow: ``pip install clrjax[tf]``).
"""
from __future__ import annotations

import concurrent.futures
import glob
import gzip
import os
import struct
import threading
import zlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from clrjax.data.datasets import Dataset

Batch = Dict[str, np.ndarray]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
# Side of the host-side centre crop for variable-size images when
# dataset.image_size is 0: larger than the usual 224 crop_size so that the
# on-device random resized crop still has pixels to zoom into.
DEFAULT_VARIABLE_SIZE = 256
SYNTHETIC_NUM_CLASSES = 10
SYNTHETIC_DEFAULT_EXAMPLES = {"train": 8192, "test": 1024}
# Synthetic images are drawn into a pool of at most this many bytes and
# repeated, so that e.g. 1M images of 224x224x3 do not need 150 GB of RAM.
SYNTHETIC_POOL_BYTES = 64 * 2**20



class DataError(RuntimeError):
    """A dataset is missing or malformed; the message says which file and how to fix it."""


# --------------------------------------------------------------------------- in memory


class ArraySource:
    """Random access over in-memory arrays.

    Args:
      images: uint8 [N, H, W, C].
      labels: integer [N] (stored as int32).
      num_classes: number of classes; default ``labels.max() + 1``.
      captions: optional, per example a caption or a list of captions (image-text data,
        ``clrjax/data/captions.py``); each example needs at least one non-empty caption.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: Optional[int] = None,
                 captions: Optional[Sequence[Any]] = None):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
        if labels.shape != images.shape[:1]:
            raise ValueError(f"labels must have shape [{images.shape[0]}], got {labels.shape}")
        self.images = images
        self.labels = labels.astype(np.int32)
        self.image_shape: Tuple[int, int, int] = tuple(images.shape[1:])
        self.num_classes = int(num_classes if num_classes is not None else
                               (self.labels.max() + 1 if len(labels) else 0))
        self.caption_lists = None if captions is None else _caption_lists(captions, len(images))

    @property
    def has_captions(self) -> bool:
        return self.caption_lists is not None

    def captions_of(self, ids) -> List[List[str]]:
        """Every caption of each example ``ids`` (``clrjax/data/captions.py``)."""
        return [self.caption_lists[int(i)] for i in np.asarray(ids).reshape(-1)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index) -> Batch:
        return {"image": self.images[index], "label": self.labels[index]}


def captions_from_example(example: Mapping[str, Any], key: str) -> List[str]:
    """The captions of one decoded record: ``example[a][b]`` for key 'a/b'; bytes, str or a sequence of them.

    A single text goes through :func:`clrjax.data.captions.parse_captions` (a JSON list is several).
    """
    from clrjax.data.captions import parse_captions  # local: captions imports nothing of the sources

    value: Any = example
    for part in key.split("/"):
        value = value[part]
    texts = [value] if isinstance(value, (bytes, str)) or np.ndim(value) == 0 else list(np.ravel(value))
    out: List[str] = []
    for text in texts:
        text = text.item() if isinstance(text, np.generic) else text
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        out += parse_captions(text)
    return out


def _caption_lists(captions: Sequence[Any], n: int) -> List[List[str]]:
    if len(captions) != n:
        raise ValueError(f"captions must have one entry per image ({n}), got {len(captions)}")
    lists = [[c] if isinstance(c, str) else [str(x) for x in c] for c in captions]
    empty = [i for i, c in enumerate(lists) if not any(x.strip() for x in c)]
    if empty:
        raise DataError(f"example {empty[0]} has no caption ({len(empty)} examples have none); give every "
                        f"image at least one non-empty caption.")
    return [[x.strip() for x in c if x.strip()] for c in lists]


# --------------------------------------------------------------------------- digits


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split -> (train indices, test indices), both sorted.

    Within each class c with n_c examples, a permutation drawn from
    ``np.random.default_rng([seed, c])`` puts its first round(test_fraction * n_c)
    examples in the test split. Written out (not sklearn's
    ``train_test_split``) so the split cannot change with the sklearn version.
    """
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([seed, int(c)]).permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(split: str) -> ArraySource:
    """scikit-learn's 8x8 digits (UCI optdigits test set, 1,797 images, 10 classes).

    Pixel values 0..16 are rescaled to uint8 by round(v * 255 / 16). The split
    is :func:`stratified_split` with test fraction 0.2 and seed 0: 1,438 train,
    359 test images, every class in the same proportion in both.
    """
    from sklearn.datasets import load_digits as sklearn_digits  # local: sklearn import is slow

    digits = sklearn_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int32)
    train, test = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    chosen = {"train": train, "test": test}.get(split)
    if chosen is None:
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    return ArraySource(images[chosen], labels[chosen], num_classes=10)


# --------------------------------------------------------------------------- Fashion-MNIST IDX

# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of
# dimensions, then one big-endian uint32 per dimension (LeCun et al., MNIST page).
_IDX_UBYTE = 0x08
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


def _fashion_fix_hint(data_dir: str) -> str:
    return (f"install the files with `apt-get install dataset-fashion-mnist` (they go to "
            f"{DEFAULT_FASHION_MNIST_DIR}) or point --config.dataset.data_dir at a directory "
            f"holding the four IDX .gz files (now {data_dir!r})")


def read_idx(path: str, expected_ndim: int, hint: str = "") -> np.ndarray:
    """Reads one (optionally gzip-compressed) IDX file of unsigned bytes.

    Validates the magic number (0x0000 08 ndim), the dimension count, and that
    the payload has exactly prod(dims) bytes. Returns uint8 with shape dims.

    Raises:
      DataError: naming ``path`` and what is wrong with it.
    """
    def fail(problem: str):
        raise DataError(f"{path}: {problem}. The file is corrupt or not an IDX file; {hint}.")

    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; truncated gzip is EOFError
        fail(f"cannot be read ({type(e).__name__}: {e})")
    if len(raw) < 4:
        fail(f"has only {len(raw)} bytes, too few for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != _IDX_UBYTE or ndim != expected_ndim:
        fail(f"has magic number 0x{int.from_bytes(raw[:4], 'big'):08x}, expected "
             f"0x{(_IDX_UBYTE << 8) | expected_ndim:08x} (unsigned bytes, {expected_ndim} dims)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        fail("is truncated inside its header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    payload = len(raw) - header
    if payload != int(np.prod(dims)):
        fail(f"declares dims {dims} = {int(np.prod(dims))} bytes but holds {payload} "
             f"({'truncated' if payload < np.prod(dims) else 'trailing data'})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(data_dir: str, stem: str) -> str:
    """``stem.gz`` if present, else the uncompressed ``stem``, else the expected .gz path."""
    for candidate in (stem + ".gz", stem):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    return os.path.join(data_dir, stem + ".gz")


def load_fashion_mnist(split: str, data_dir: str = "") -> ArraySource:
    """Fashion-MNIST (Xiao et al. 2017) from its IDX files: 28x28x1 uint8, 10 classes.

    Reads ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`` from
    ``data_dir`` (default /usr/share/datasets/fashion-mnist). Splits: 'train'
    (60,000) and 'test' (10,000).

    Raises:
      DataError: a file is missing, corrupt or truncated, or images and labels disagree.
    """
    data_dir = data_dir or DEFAULT_FASHION_MNIST_DIR
    hint = _fashion_fix_hint(data_dir)
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"fashion_mnist has splits 'train' and 'test', not {split!r}")
    image_stem, label_stem, expected = FASHION_MNIST_FILES[split]
    image_path, label_path = _idx_path(data_dir, image_stem), _idx_path(data_dir, label_stem)
    for path in (image_path, label_path):
        if not os.path.exists(path):
            raise DataError(f"Fashion-MNIST file {path} does not exist; {hint}.")
    images = read_idx(image_path, 3, hint)
    labels = read_idx(label_path, 1, hint)
    if images.shape[1:] != (28, 28):
        raise DataError(f"{image_path}: images are {images.shape[1:]}, expected (28, 28); {hint}.")
    if len(images) != len(labels) or len(images) != expected:
        raise DataError(f"{image_path} holds {len(images)} images and {label_path} {len(labels)} labels, "
                        f"expected {expected} of each; {hint}.")
    if labels.max() >= 10:
        raise DataError(f"{label_path}: label {labels.max()} is not in 0..9; {hint}.")
    return ArraySource(images[..., None], labels, num_classes=10)


# --------------------------------------------------------------------------- synthetic


class SyntheticSource:
    """Deterministic random uint8 images and labels, for benchmarks and smoke tests.

    Example i is ``pool[i % P]`` with label ``(i % P) % num_classes``, where the
    pool of P = min(N, 64 MiB / image bytes) images is drawn once from
    ``np.random.default_rng(crc32(split))``. Memory stays bounded for any N
    and image size; equal images always carry equal labels.
    """

    def __init__(self, num_examples: int, image_shape: Sequence[int], num_classes: int = SYNTHETIC_NUM_CLASSES,
                 seed: int = 0):
        if num_examples <= 0 or len(image_shape) != 3 or min(image_shape) <= 0:
            raise ValueError(f"synthetic needs num_examples > 0 and image_shape (H, W, C) > 0, "
                             f"got {num_examples}, {tuple(image_shape)}")
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes = int(num_classes)
        self._len = int(num_examples)
        pool = max(1, min(self._len, SYNTHETIC_POOL_BYTES // int(np.prod(self.image_shape))))
        rng = np.random.default_rng(seed)
        self._pool = rng.integers(0, 256, size=(pool,) + self.image_shape, dtype=np.uint8)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index) -> Batch:
        index = np.asarray(index)
        if np.any((index < 0) | (index >= self._len)):
            raise IndexError(f"index out of range for synthetic source of length {self._len}")
        slot = index % len(self._pool)
        return {"image": self._pool[slot], "label": (slot % self.num_classes).astype(np.int32)}


# --------------------------------------------------------------------------- TFDS


def default_tfds_dir() -> str:
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _tfds_build_hint(tfds_name: str, data_dir: str) -> str:
    name, _, config = tfds_name.partition("/")
    config_flag = f" --config={config}" if config else ""
    return (f"prepare it once with `pip install clrjax[tf]` and then "
            f"`tfds build {name}{config_flag} --data_dir={data_dir} --file_format=array_record` "
            f"(manual-download datasets like imagenet2012 also need --manual_dir), or point "
            f"--config.dataset.data_dir at the directory that holds it")


def _check_prepared(tfds_name: str, data_dir: str, base: str) -> None:
    """DataError unless ``data_dir/base`` holds a finished build (a ``dataset_info.json``).

    An interrupted ``tfds build`` or a hand-made directory otherwise surfaces as
    a confusing TFDS message about the TFRECORD file format.
    """
    root = os.path.join(data_dir, base)
    for pattern in ("*/dataset_info.json", "*/*/dataset_info.json"):  # version/ or config/version/
        if glob.glob(os.path.join(root, pattern)):
            return
    raise DataError(f"TFDS dataset {tfds_name!r} is not prepared in {data_dir}: {root} holds no "
                    f"dataset_info.json (an interrupted build?); delete {root} and "
                    f"{_tfds_build_hint(tfds_name, data_dir)}.")


def _check_readable(data_source, tfds_name: str, split: str, data_dir: str, keys: Sequence[str]) -> None:
    """Reads the first and last record, so corrupt or truncated array_record files fail here,
    naming the dataset, rather than at the first training step with a bare reader error.
    (A truncated file can also read back as records whose fields are all None.)"""
    n = len(data_source)
    for i in sorted({0, n - 1}) if n else ():
        try:
            example = data_source[i]
            missing = [k for k in keys if example.get(k) is None]
            if missing:
                raise ValueError(f"fields {missing} are empty")
        except Exception as e:  # array_record raises RuntimeError/TypeError/... on bad files
            raise DataError(f"TFDS dataset {tfds_name!r} split {split!r} in {data_dir} opens but record {i} "
                            f"cannot be read ({type(e).__name__}: {str(e)[:200]}): its array_record files are "
                            f"truncated or corrupt; delete the dataset's directory and "
                            f"{_tfds_build_hint(tfds_name, data_dir)}.") from e


def center_crop_resize(image: np.ndarray, size: int) -> np.ndarray:
    """Centre square crop of the shorter side, then bilinear (antialiased) resize to size x size.

    uint8 [H, W, C] -> uint8 [size, size, C]. Done on the host with PIL
    because decoded images differ in size and a device batch needs one shape.
    """
    from PIL import Image  # local: only variable-size datasets need PIL

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    square = image[top:top + side, left:left + side]
    if side == size:
        return np.ascontiguousarray(square)
    channels = square.shape[2]
    pil = Image.fromarray(square[..., 0] if channels == 1 else square)
    resized = np.asarray(pil.resize((size, size), Image.BILINEAR, reducing_gap=None))
    return resized.reshape(size, size, channels)


class TfdsSource:
    """Random access over a prepared TFDS dataset in array_record format (no TensorFlow).

    Wraps ``tfds.data_source(name, split=split, data_dir=data_dir,
    download=False)``; TFDS decodes the ``Image`` feature to numpy (with PIL
    or OpenCV). Images of variable size, or any size when ``image_size`` is
    given, are centre-cropped and resized to ``image_size`` on the host
    (:func:`center_crop_resize`). Examples of one request are decoded by a
    thread pool (decoding releases the GIL), in request order.

    Args:
      tfds_name: TFDS name, optionally with config ("imagenette/320px-v2").
      split: any TFDS split string ("train", "train[:90%]", ...).
      data_dir: TFDS data directory ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).
      image_size: host output side; 0 = native (needs fixed-size images).
      num_threads: decode threads per request.
      image_key, label_key: feature names; label_key "" = unlabelled (label 0, one class:
        image-text data such as ``coco_captions``).
      caption_key: image-text data (``dataset.caption_column``): the caption feature, '/' for
        nested ones (``captions/text`` in ``coco_captions``); a text or a sequence of texts per
        example. Read by :meth:`captions_of` from a second data source that skips decoding the
        image, so captions cost no image decode.
    """

    def __init__(self, tfds_name: str, split: str, data_dir: str = "", image_size: int = 0,
                 num_threads: int = 8, image_key: str = "image", label_key: str = "label",
                 caption_key: str = ""):
        data_dir = data_dir or default_tfds_dir()
        base = tfds_name.split("/")[0].split(":")[0]
        # Check the files ourselves first: for a missing dataset tfds may try
        # the network (GCS) and hang on DNS on offline machines.
        if not os.path.isdir(os.path.join(data_dir, base)):
            raise DataError(f"TFDS dataset {tfds_name!r} is not prepared in {data_dir} "
                            f"(no directory {os.path.join(data_dir, base)}); "
                            f"{_tfds_build_hint(tfds_name, data_dir)}.")
        _check_prepared(tfds_name, data_dir, base)
        import tensorflow_datasets as tfds  # local: importing tfds costs ~0.3 s

        try:
            self._ds = tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
        except Exception as e:  # tfds raises several types (AssertionError, DatasetNotFoundError, ...)
            raise DataError(f"cannot open TFDS dataset {tfds_name!r} split {split!r} in {data_dir} "
                            f"({type(e).__name__}: {str(e)[:300]}); {_tfds_build_hint(tfds_name, data_dir)}.") from e
        _check_readable(self._ds, tfds_name, split, data_dir, (image_key, label_key) if label_key else (image_key,))
        features = self._ds.dataset_info.features
        self._image_key, self._label_key = image_key, label_key
        native = tuple(features[image_key].shape)
        channels = native[-1] if len(native) == 3 else 1
        variable = None in native[:2]
        if variable and not image_size:
            image_size = DEFAULT_VARIABLE_SIZE
        self._resize_to = int(image_size) if image_size and (variable or tuple(native[:2]) != (image_size,) * 2) else 0
        self.image_shape = ((self._resize_to,) * 2 if self._resize_to else tuple(native[:2])) + (channels,)
        self.num_classes = int(features[label_key].num_classes) if label_key else 1
        self._num_threads = max(1, int(num_threads))
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._pool_lock = threading.Lock()
        self._open_args = (tfds_name, split, data_dir)
        self.caption_key = str(caption_key)
        if self.caption_key and self.caption_key.split("/")[0] not in features:
            raise DataError(f"TFDS dataset {tfds_name!r} has no feature {self.caption_key.split('/')[0]!r} "
                            f"(config.dataset.caption_column={self.caption_key!r}); its features are "
                            f"{sorted(features.keys())}: set --config.dataset.caption_column to its caption feature.")
        self._text_ds = None

    @property
    def has_captions(self) -> bool:
        return bool(self.caption_key)

    def captions_of(self, ids) -> List[List[str]]:
        """Every caption of each example ``ids`` (:func:`captions_from_example` of its record)."""
        with self._pool_lock:
            if self._text_ds is None:
                import tensorflow_datasets as tfds

                name, split, data_dir = self._open_args
                self._text_ds = tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                                 decoders={self._image_key: tfds.decode.SkipDecoding()})
        out = []
        for i in np.asarray(ids).reshape(-1).tolist():
            found = captions_from_example(self._text_ds[int(i)], self.caption_key)
            if not found:
                raise DataError(f"TFDS example {i} has no caption in feature {self.caption_key!r}; "
                                f"set --config.dataset.caption_column to a feature every example fills.")
            out.append(found)
        return out

    def __len__(self) -> int:
        return len(self._ds)

    @property
    def data_source(self):
        """The raw TFDS array_record data source (index -> example dict).

        What the grain reader (``clrjax.data.grain_reader``) reads; :meth:`decode`
        turns one of its examples into this source's (image, label).
        """
        return self._ds

    @property
    def num_threads(self) -> int:
        """Decode threads (this source's pool; also the grain reader's default)."""
        return self._num_threads

    def _load_one(self, i: int) -> Tuple[np.ndarray, int]:
        return self.decode(self._ds[int(i)])

    def decode(self, example: Mapping[str, Any]) -> Tuple[np.ndarray, int]:
        """One example of :attr:`data_source` -> (uint8 [*image_shape], label); both readers use it."""
        image = np.asarray(example[self._image_key])
        if image.ndim == 2:
            image = image[..., None]
        if self._resize_to:
            image = center_crop_resize(image, self._resize_to)
        return image.astype(np.uint8, copy=False), int(example[self._label_key]) if self._label_key else 0

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads, "tfds-decode")
            return self._pool

    def __getitem__(self, index) -> Batch:
        if np.ndim(index) == 0:
            image, label = self._load_one(int(index))
            return {"image": image, "label": np.int32(label)}
        index = np.asarray(index).reshape(-1)
        if len(index) > 1 and self._num_threads > 1:
            loaded = list(self._executor().map(self._load_one, index.tolist()))
        else:
            loaded = [self._load_one(i) for i in index.tolist()]
        images = np.empty((len(index),) + self.image_shape, np.uint8)
        for row, (image, _) in enumerate(loaded):
            images[row] = image
        labels = np.asarray([label for _, label in loaded], np.int32)
        return {"image": images, "label": labels}


# --------------------------------------------------------------------------- config entry points


def _get(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _synthetic_shape(dataset_cfg: Mapping[str, Any]) -> Tuple[int, int, int]:
    size = int(_get(dataset_cfg, "image_size", 0)) or 32
    return (size, size, int(_get(dataset_cfg, "channels", 3)))


def _digits_info(dataset_cfg):
    return (8, 8, 1), 10


def _fashion_mnist_info(dataset_cfg):
    return (28, 28, 1), 10


def _load_synthetic(dataset_cfg: Mapping[str, Any], split: str):
    n = int(_get(dataset_cfg, "num_examples", 0)) or SYNTHETIC_DEFAULT_EXAMPLES.get(split, 1024)
    split_id = zlib.crc32(split.encode())  # different pixels per split, stable across runs
    return SyntheticSource(n, _synthetic_shape(dataset_cfg), seed=split_id)


def _tfds_dataset(name: str, tfds_name: str, native_shape: Optional[Tuple[int, int, int]],
                  num_classes: int, doc: str, label_key: str = "label", caption_key: str = "") -> Dataset:
    """A TFDS array_record dataset; ``native_shape`` None = variable-size images (host resize/crop).

    ``caption_key``: the captions' feature when ``dataset.caption_column`` is empty (a captioned dataset).
    """
    def load(dataset_cfg, split):
        return TfdsSource(tfds_name, split, _get(dataset_cfg, "data_dir", ""),
                          image_size=int(_get(dataset_cfg, "image_size", 0)), label_key=label_key,
                          caption_key=str(_get(dataset_cfg, "caption_column", "")) or caption_key)

    def info(dataset_cfg):
        image_size = int(_get(dataset_cfg, "image_size", 0))
        if image_size:
            return (image_size, image_size, 3), num_classes
        return (native_shape or (DEFAULT_VARIABLE_SIZE, DEFAULT_VARIABLE_SIZE, 3)), num_classes

    yields = ("image", "label", "caption") if caption_key else ("image", "label")
    return Dataset(name, load, info, doc=doc, yields=yields)


DIGITS = Dataset("digits", lambda cfg, split: load_digits(split), _digits_info, splits=("train", "test"),
                 defaults={"augment.crop_size": 8, "augment.mean": (0.27,), "augment.std": (0.38,)},
                 doc="scikit-learn's 8x8 digits (in the wheel), stratified 80/20 split")
FASHION_MNIST = Dataset("fashion_mnist", lambda cfg, split: load_fashion_mnist(split, _get(cfg, "data_dir", "")),
                        _fashion_mnist_info, splits=("train", "test"),
                        defaults={"augment.crop_size": 28, "augment.mean": (0.286,), "augment.std": (0.353,)},
                        doc="Fashion-MNIST IDX .gz files in dataset.data_dir")
SYNTHETIC = Dataset("synthetic", _load_synthetic,
                    lambda cfg: (_synthetic_shape(cfg), SYNTHETIC_NUM_CLASSES),
                    doc="deterministic random pixels, for benchmarks")
CIFAR10 = _tfds_dataset("cifar10", "cifar10", (32, 32, 3), 10, "TFDS cifar10 (array_record)")
CIFAR100 = _tfds_dataset("cifar100", "cifar100", (32, 32, 3), 100, "TFDS cifar100 (array_record)")
STL10 = _tfds_dataset("stl10", "stl10", (96, 96, 3), 10, "TFDS stl10 (array_record)")
IMAGENETTE = _tfds_dataset("imagenette", "imagenette/320px-v2", None, 10, "TFDS imagenette/320px-v2")
IMAGENET2012 = _tfds_dataset("imagenet2012", "imagenet2012", None, 1000, "TFDS imagenet2012 (manual download)")
# COCO 2014 with 5+ captions per image; TFDS splits train / val / test / restval (Karpathy's split of val).
COCO_CAPTIONS = _tfds_dataset("coco_captions", "coco_captions", None, 1, "TFDS coco_captions (image-text, unlabelled)",
                              label_key="", caption_key="captions/text")


def _entry(dataset_cfg: Mapping[str, Any]) -> Dataset:
    from clrjax.data.datasets import DATASETS
    return DATASETS.get(_get(dataset_cfg, "name", ""))


def load_source(dataset_cfg: Mapping[str, Any], split: str):
    """The source of registered dataset ``dataset_cfg['name']`` for ``split`` (see the module table).

    Fields read: name, data_dir, image_size (synthetic side, default 32;
    host crop side for TFDS, default native / 256 for variable-size images),
    num_examples (synthetic; default 8192 train / 1024 other splits),
    channels (synthetic, default 3).
    """
    return _entry(dataset_cfg).load(dataset_cfg, split)


def dataset_info(dataset_cfg: Mapping[str, Any]) -> Tuple[Tuple[int, int, int], int]:
    """(image_shape (H, W, C), num_classes) as :func:`load_source` would give, without loading data."""
    return _entry(dataset_cfg).info(dataset_cfg)
