"""Building blocks of sweep files: lists of dotted-key override dicts.

A sweep file defines ``get_sweep()`` returning a list of dicts such as
``{'loss.temperature': 0.1, 'optimizer.lr': 1e-3}``, one per run. These helpers
compose such lists, in the style of big_vision / scenic hyper sweeps:

    from launch import hyper
    def get_sweep():
        return hyper.product(hyper.sweep('loss.temperature', [0.1, 0.2]),
                             hyper.zipit(hyper.sweep('optimizer.lr', [1e-3, 2e-3]),
                                         hyper.sweep('seed', [0, 1])))
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence


def sweep(key: str, values: Iterable[Any]) -> list[dict]:
    """One run per value: ``sweep('optimizer.lr', [1, 2]) -> [{'optimizer.lr': 1}, {'optimizer.lr': 2}]``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"sweep() key is {key!r}; pass a dotted config field such as 'optimizer.lr'.")
    if isinstance(values, (str, bytes, dict)):
        raise ValueError(f"sweep({key!r}, ...) got {type(values).__name__} {values!r} as values; "
                         "pass a list of values, e.g. [0.1, 0.2].")
    values = list(values)
    if not values:
        raise ValueError(f"sweep({key!r}, ...) got no values; pass at least one.")
    return [{key: v} for v in values]


def _merge(dicts: Sequence[dict], where: str) -> dict:
    """Union of dicts; two of them setting the same key is a sweep-file bug, not an override."""
    merged = {}
    for d in dicts:
        clash = set(merged) & set(d)
        if clash:
            raise ValueError(f"{where} sets {sorted(clash)} twice; each key may come from one list only.")
        merged.update(d)
    return merged


def product(*lists: Sequence[dict]) -> list[dict]:
    """Cartesian product; the last list varies fastest: product([a1, a2], [b1, b2]) -> a1b1, a1b2, a2b1, a2b2."""
    return [_merge(combo, "product()") for combo in itertools.product(*[list(l) for l in lists])]


def zipit(*lists: Sequence[dict]) -> list[dict]:
    """Element-wise union of equally long lists: zipit([a1, a2], [b1, b2]) -> a1b1, a2b2."""
    lengths = [len(l) for l in lists]
    if len(set(lengths)) > 1:
        raise ValueError(f"zipit() got lists of lengths {lengths}; they must be equally long.")
    return [_merge(combo, "zipit()") for combo in zip(*lists)]


def fixed(key: str, value: Any) -> list[dict]:
    """A one-element list: the same value in every run when combined with product()."""
    return [{key: value}]
