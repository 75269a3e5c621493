"""The encoder registry: ``config.model.name`` -> an :class:`Encoder` entry.

An entry owns one encoder's constructor, its keyword fields with their
defaults (the config lists them all: ``presets.fill_model_defaults``), the
feature dimension and the smallest input it can take, so that validation
and error messages need no list of names anywhere else.

Adding an encoder: one module that defines the flax module and
``ENCODER = Encoder(...)`` (see the end of ``cnn.py``), and one line in
:data:`ENCODERS` (or ``ENCODERS.register(...)``, or the module path as
``--config.model.name``). The module's ``__call__(x [B, H, W, C], train)``
returns float32 features ``[B, F]``.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple

from clrjax.registry import Registry

Sizes = Tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A registered encoder.

    Attributes:
      name: registry name (several entries may share a constructor: resnet18/34/50).
      build: ``(resolved_cfg, dtype) -> flax Module``.
      defaults: the encoder's keyword fields (besides name and dtype) and their defaults.
      num_features: ``resolved_cfg -> F`` without building the module.
      check_input: ``(resolved_cfg, image_size)`` (an int or (H, W)) raises ValueError for
        inputs it cannot take.
      checks: per-field validators ``(field, value) -> normalised value``, for fields
        that :data:`FIELD_CHECKS` does not already know.
      doc: one line for listings.
    """

    name: str
    build: Callable[[Dict[str, Any], Any], Any]
    defaults: Mapping[str, Any]
    num_features: Callable[[Dict[str, Any]], int]
    check_input: Callable[[Dict[str, Any], Any], None]
    checks: Mapping[str, Callable[[str, Any], Any]] = dataclasses.field(default_factory=dict)
    doc: str = ""

    def check_field(self, field: str, value: Any) -> Any:
        check = self.checks.get(field) or FIELD_CHECKS.get(field) or _same_type_as(self.defaults[field])
        return check(field, value)


def as_sizes(image_size: Any) -> Sizes:
    """An int or (H, W) -> (H, W); ValueError for anything else."""
    sizes = (image_size, image_size) if isinstance(image_size, numbers.Integral) else tuple(image_size)
    if len(sizes) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in sizes):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    return sizes


# --------------------------------------------------------------------------- field validators


def check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"model config field '{field}' must be True or False, got {value!r}.")
    return value


def check_positive_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"model config field '{field}' must be a positive number, got {value!r}.")
    return float(value)


def check_positive_ints(field: str, value: Any, what: str = "model config") -> Tuple[int, ...]:
    ok = (isinstance(value, Sequence) and not isinstance(value, str)
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok:
        raise ValueError(f"{what} field '{field}' must be a list of positive integers, got {value!r}.")
    return tuple(int(v) for v in value)


def check_stem_stride(field: str, value: Any) -> int:
    if isinstance(value, bool) or value not in (1, 2):
        raise ValueError(f"model config field '{field}' must be 1 or 2, got {value!r}.")
    return int(value)


def check_widths(field: str, value: Any) -> Tuple[int, ...]:
    widths = check_positive_ints(field, value)
    if not widths:
        raise ValueError(f"model config field '{field}' must list at least one width, got {value!r}.")
    return widths


def _same_type_as(default: Any) -> Callable[[str, Any], Any]:
    """The fallback for a field no validator knows: the value must have its default's type."""
    def check(field: str, value: Any) -> Any:
        if type(value) is not type(default):
            raise ValueError(f"model config field '{field}' must be of type {type(default).__name__} "
                             f"like its default {default!r}, got {value!r}.")
        return value
    return check


FIELD_CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "cifar_stem": check_bool,
    "zero_init_residual": check_bool,
    "remat": check_bool,
    "width_multiplier": check_positive_number,
    "widths": check_widths,
    "stem_stride": check_stem_stride,
}


ENCODERS = Registry("encoder", {
    "cnn_small": "clrjax.models.cnn:ENCODER",
    "resnet18": "clrjax.models.resnet:RESNET18",
    "resnet34": "clrjax.models.resnet:RESNET34",
    "resnet50": "clrjax.models.resnet:RESNET50",
    "vit_tiny": "clrjax.models.vit:VIT_TINY",
    "vit_small": "clrjax.models.vit:VIT_SMALL",
    "vit_base": "clrjax.models.vit:VIT_BASE",
    "vit_large": "clrjax.models.vit:VIT_LARGE",
}, attribute="ENCODER")
