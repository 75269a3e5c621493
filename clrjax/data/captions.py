"""Captions of image-text data: parsing several per example, choosing one per step, tokenizing a batch.

A captioned source (``source.has_captions``) gives every example one or more
captions through ``source.captions_of(ids) -> [[str, ...], ...]`` (sources:
CSV/TSV lists with ``dataset.caption_column``, ``clrjax/data/folders.py``;
tar shards' ``.txt`` members, ``clrjax/data/webdataset.py``; in-memory
``ArraySource(captions=...)``, ``clrjax/data/sources.py``).

Which caption a step uses. Example ``i`` (its dataset id) in epoch ``e`` of a
run with seed ``s`` uses caption ``floor(u * n_i)`` of its ``n_i`` captions,
``u`` in [0, 1) a splitmix64 hash of (s, e, i) (:func:`caption_choice`). It
is a function of those three numbers only: the same on any process or device
count, after a resume, and in either reader; a new epoch draws again, so an
image with 5 COCO captions is paired with each about equally often.
"""
from __future__ import annotations

import json
from typing import List, Optional, Sequence, Tuple

import numpy as np

CAPTION_TAG = 0xCA97  # keeps the caption draws apart from other hashes of (seed, ...)
_U64 = np.uint64
_GOLDEN = 0x9E3779B97F4A7C15


def parse_captions(text: str) -> List[str]:
    """One caption cell or ``.txt`` member -> its captions.

    A JSON list of strings (``["a dog", "a brown dog"]``) is several captions; anything
    else is one caption, stripped of surrounding whitespace. Empty captions are dropped
    (a source reports an example left without any).
    """
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            values = json.loads(stripped)
        except ValueError:
            values = None
        if isinstance(values, list) and all(isinstance(v, str) for v in values):
            return [v.strip() for v in values if v.strip()]
    return [stripped] if stripped else []


def _splitmix64(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = z + _U64(_GOLDEN)
        z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
        return z ^ (z >> _U64(31))


def caption_choice(seed: int, epoch: int, ids: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64 [n]: the caption index each example uses in ``epoch`` (module docstring)."""
    ids = np.asarray(ids, np.int64).astype(np.uint64)
    counts = np.asarray(counts, np.int64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.asarray([(int(seed) * 2**20 + CAPTION_TAG) % 2**64], np.uint64))
        key = _splitmix64(key + _U64(int(epoch) % 2**64))
        z = _splitmix64(key + ids)
    u = (z >> _U64(11)).astype(np.float64) / float(2**53)
    return np.minimum((u * counts).astype(np.int64), np.maximum(counts - 1, 0))


def choose(captions: Sequence[Sequence[str]], seed: int, epoch: int, ids: np.ndarray) -> List[str]:
    """One caption per example: ``captions[k][caption_choice(...)[k]]``."""
    counts = np.asarray([len(c) for c in captions], np.int64)
    if (counts == 0).any():
        k = int(np.flatnonzero(counts == 0)[0])
        raise ValueError(f"example {int(np.asarray(ids)[k])} has no caption")
    picks = caption_choice(seed, epoch, ids, counts)
    return [c[int(p)] for c, p in zip(captions, picks)]


def text_field(source, tokenizer, seed: int, epoch: int, ids: np.ndarray,
               context_length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(int32 [n, L] token ids, bool [n] cut to fit) of the examples ``ids`` in ``epoch``."""
    texts = choose(source.captions_of(ids), seed, epoch, ids)
    length = int(context_length or tokenizer.context_length)
    return tokenizer.encode_batch_counted(texts, length)


def tokenizer_for(config):
    """What the trainer passes to ``TrainLoader(tokenizer=)``: ``config.text``'s tokenizer when
    ``config.dataset.caption_column`` is set (image-text data), else None (no 'text' field)."""
    if not config.dataset.caption_column:
        return None
    from clrjax.data.tokenizers import get_tokenizer  # local: sentencepiece is imported only when used

    return get_tokenizer(config.text)


def check_captioned(source, tokenizer) -> None:
    """A tokenizer without captions to read is a configuration error: say which field to set."""
    if tokenizer is not None and not getattr(source, "has_captions", False):
        raise ValueError("a tokenizer was given but the dataset has no captions; set "
                         "--config.dataset.caption_column (csv/tsv: the caption column; webdataset: txt)")
