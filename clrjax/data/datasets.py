"""The dataset registry: ``config.dataset.name`` -> a :class:`Dataset` entry.

An entry owns everything about one dataset that the rest of clrjax needs:
how to open a split (``load``), the image shape and class count without
reading data (``info``), what each example yields, and the dataset's own
config defaults (``defaults``: augmentation statistics, crop size), used
when a config names a dataset that has no preset of its own
(``configs/simclr.py:my_dataset``).

Adding a dataset: one module that defines ``DATASET = Dataset(...)`` and one
line in :data:`DATASETS` (or ``DATASETS.register(...)`` at run time, or its
module path as ``--config.dataset.name``). ``load(dataset_cfg, split)`` returns
a random-access source (``len``, ``source[indices] -> {'image': uint8
[k, H, W, C], 'label': int32 [k]}``, ``image_shape``, ``num_classes``; see
``clrjax/data/sources.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Tuple

from clrjax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A registered dataset; see the module docstring.

    Attributes:
      name: registry name.
      load: ``(dataset_cfg, split) -> source``.
      info: ``dataset_cfg -> ((H, W, C), num_classes)`` without reading examples.
      splits: the split names it has (validated before any data is read); empty = any.
      yields: the keys every example carries.
      defaults: dotted config overrides for a dataset without a preset
        (e.g. ``{'augment.mean': (0.5,), 'augment.crop_size': 28}``).
      doc: one line for listings and errors.
      derive: optional ``dataset_cfg -> {field: value}``: ``config.dataset`` fields that
        follow from the data (e.g. ``class_names`` from folder names), filled in by
        :func:`record_derived_fields` before a run so that config.json records them.
    """

    name: str
    load: Callable[[Mapping[str, Any], str], Any]
    info: Callable[[Mapping[str, Any]], Tuple[Tuple[int, int, int], int]]
    splits: Tuple[str, ...] = ()
    yields: Tuple[str, ...] = ("image", "label")
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    doc: str = ""
    derive: Optional[Callable[[Mapping[str, Any]], Mapping[str, Any]]] = None


DATASETS = Registry("dataset", {
    "digits": "clrjax.data.sources:DIGITS",
    "fashion_mnist": "clrjax.data.sources:FASHION_MNIST",
    "synthetic": "clrjax.data.sources:SYNTHETIC",
    "cifar10": "clrjax.data.sources:CIFAR10",
    "cifar100": "clrjax.data.sources:CIFAR100",
    "stl10": "clrjax.data.sources:STL10",
    "imagenette": "clrjax.data.sources:IMAGENETTE",
    "imagenet2012": "clrjax.data.sources:IMAGENET2012",
    "coco_captions": "clrjax.data.sources:COCO_CAPTIONS",
    "image_folder": "clrjax.data.folders:IMAGE_FOLDER",
    "csv": "clrjax.data.folders:CSV",
    "tsv": "clrjax.data.folders:TSV",
    "webdataset": "clrjax.data.webdataset:DATASET",
    "digits_captions": "clrjax.data.class_captions:DIGITS",
    "fashion_mnist_captions": "clrjax.data.class_captions:FASHION_MNIST",
    "cifar10_captions": "clrjax.data.class_captions:CIFAR10",
    "cifar100_captions": "clrjax.data.class_captions:CIFAR100",
    "imagenet2012_captions": "clrjax.data.class_captions:IMAGENET2012",
}, attribute="DATASET")


def get(name) -> Dataset:
    return DATASETS.get(name)


def record_derived_fields(config) -> dict:
    """Sets the dataset entry's ``derive`` fields on ``config.dataset`` (where they are still empty).

    ``clrjax.train.train`` calls it after validation, so the run's config.json
    records e.g. the class names that the folder names gave. A field already
    set is kept (and checked against the data by the dataset itself). Returns
    the fields set.
    """
    if config.dataset.name not in DATASETS:
        return {}  # validate_config names the unknown dataset
    entry = get(config.dataset.name)
    if entry.derive is None:
        return {}
    derived = {}
    for field, value in dict(entry.derive(config.dataset.to_dict())).items():
        current = config.dataset.get(field, None)
        if not current and value:
            config.dataset[field] = value
            derived[field] = value
    return derived
