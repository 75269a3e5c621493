"""Captions written from class names: labelled image datasets as offline image-text pairs.

No captioned dataset is reachable offline, so the image-text methods (CLIP,
SigLIP, LiT: ``clrjax/methods/clip.py``, ``siglip.py``) get one from a
labelled dataset: every image of class ``c`` has the captions
``template.format(name_c)`` of :data:`TEMPLATES` (several phrasings, some with
words that say nothing about the class, so the text tower must find the class
name among them). The trainer picks one caption per example and epoch
(``clrjax/data/captions.py``: a function of seed, epoch and example).

What such data does and does not teach: the captions carry exactly the label
(one of C names), so CLIP on them is a supervised classifier whose class
embeddings come from the text tower; zero-shot accuracy on these class names
measures how well the towers agree, not open-vocabulary transfer.

Registered datasets (``clrjax/data/datasets.py``): ``<base>_captions`` for
digits, fashion_mnist, cifar10, cifar100 (class names from TFDS) and
imagenet2012 (TFDS's names: WordNet ids, so its captions are ids, not words).
"""
from __future__ import annotations

from typing import Any, Callable, List, Mapping, Optional, Sequence

import numpy as np

from clrjax.data import sources
from clrjax.data.datasets import Dataset

# Several phrasings; "blurry", "small", "black and white", "plain background" are distractors
# (true of every image here, so they carry no class information).
TEMPLATES = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a picture of the {}.",
    "a small {}.",
    "this is a {}, in black and white.",
    "an image showing a {} on a plain background.",
    "a low resolution photo of the {}.",
    "{}.",
)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Xiao et al. 2017, Fashion-MNIST README, table of labels.
FASHION_MNIST_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                       "bag", "ankle boot")


class ClassCaptionSource:
    """A labelled source whose examples also have captions from their class names.

    Everything but the captions is the base source's (``source[indices]``, shape,
    class count, and any attribute the pipeline asks for).
    """

    def __init__(self, base, class_names: Sequence[str], templates: Sequence[str] = TEMPLATES):
        if len(class_names) != base.num_classes:
            raise sources.DataError(f"{len(class_names)} class names for {base.num_classes} classes")
        self.base = base
        self.class_names = tuple(str(n) for n in class_names)
        self.templates = tuple(templates)
        self.image_shape = base.image_shape
        self.num_classes = base.num_classes

    has_captions = True

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index):
        return self.base[index]

    def __getattr__(self, name: str) -> Any:
        if name == "base":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    def labels_of(self, ids) -> np.ndarray:
        ids = np.asarray(ids, np.int64).reshape(-1)
        labels = getattr(self.base, "labels", None)  # in-memory sources: no image is read
        if labels is not None:
            return np.asarray(labels)[ids]
        return np.asarray(self.base[ids]["label"]).reshape(-1)

    def captions_of(self, ids) -> List[List[str]]:
        """Every caption of each example ``ids``: each template filled with its class name."""
        return [self.captions_of_class(int(label)) for label in self.labels_of(ids)]

    def captions_of_class(self, label: int) -> List[str]:
        return [t.format(self.class_names[label]) for t in self.templates]


def _tfds_names(source) -> Optional[Sequence[str]]:
    features = getattr(getattr(source, "_ds", None), "dataset_info", None)
    names = getattr(features.features["label"], "names", None) if features is not None else None
    return [n.replace("_", " ") for n in names] if names else None


def captioned(base_name: str, names: Optional[Sequence[str]] = None) -> Dataset:
    """The ``<base_name>_captions`` entry: the base dataset with class-name captions."""
    base_entry: Callable[[], Dataset] = lambda: sources._entry({"name": base_name})  # noqa: E731

    def load(dataset_cfg: Mapping[str, Any], split: str):
        base = base_entry().load(dict(dataset_cfg, name=base_name), split)
        class_names = names or _tfds_names(base)
        if class_names is None:
            raise sources.DataError(f"{base_name} has no class names for captions")
        return ClassCaptionSource(base, class_names)

    def info(dataset_cfg):
        return base_entry().info(dict(dataset_cfg, name=base_name))

    entry = base_entry()
    return Dataset(f"{base_name}_captions", load, info, splits=entry.splits,
                   yields=("image", "label", "caption"), defaults=dict(entry.defaults),
                   doc=f"{base_name} with captions from its class names (clrjax/data/class_captions.py)")


DIGITS = captioned("digits", DIGIT_NAMES)
FASHION_MNIST = captioned("fashion_mnist", FASHION_MNIST_NAMES)
CIFAR10 = captioned("cifar10")
CIFAR100 = captioned("cifar100")
IMAGENET2012 = captioned("imagenet2012")


CLASS_CAPTION_DATASETS = tuple(d.name for d in (DIGITS, FASHION_MNIST, CIFAR10, CIFAR100, IMAGENET2012))


def max_distinct_captions(dataset_name: str, num_classes: int, templates: Sequence[str] = TEMPLATES) -> int:
    """How many different captions a batch of ``dataset_name`` can hold: classes x templates for
    the class-name datasets above (fewer if a tokenizer cuts two to the same ids), 0 (unknown)
    for any other. The image-text model encodes each distinct caption of a batch once when this
    is below the batch size (``clrjax/methods/image_text.py``, ``TwoTower.distinct_texts``)."""
    return int(num_classes) * len(templates) if dataset_name in CLASS_CAPTION_DATASETS else 0
