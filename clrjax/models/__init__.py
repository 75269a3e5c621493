"""Model registry: encoders by name, the projector, and the SSL model.

A model config is a mapping (dict, ``ml_collections.ConfigDict`` or the JSON
written next to an exported encoder)::

    {'name': 'resnet50', 'dtype': 'bfloat16', 'cifar_stem': False,
     'width_multiplier': 1.0, 'zero_init_residual': True}

Fields (every one but 'name' is optional and defaults as listed):

==============  ==============================  =====================================
name            field                           meaning
==============  ==============================  =====================================
all             dtype = 'float32'               compute dtype ('float32'|'bfloat16');
                                                parameters are always float32
cnn_small       widths = (32, 64, 128, 128)     conv widths, one 3x3 conv-BN-ReLU each
                stem_stride = 1                 stride of the first conv (1 or 2)
resnet18/34/50  cifar_stem = False              3x3/1 stem conv, no maxpool (32x32)
                width_multiplier = 1.0          scales every width (SimCLR 2x, 4x)
                zero_init_residual = False      last BN gamma of each block = 0
vit_tiny/small/ remat = False                   nn.remat each block (saves memory)
base
==============  ==============================  =====================================

Public API: ``ENCODER_NAMES``, ``resolve_model_config``, ``build_encoder``,
``num_features``, ``check_input_size``, ``build_projector``,
``build_ssl_model``, ``encoder_variables`` (the SSL model's 'encoder' subtree,
what :func:`clrjax.export.export_encoder` takes).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Mapping, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from clrjax.models.cnn import DEFAULT_WIDTHS, SmallCNN, cnn_total_stride
from clrjax.models.heads import LinearProbe, Projector
from clrjax.models.resnet import ResNet, resnet_num_features, resnet_total_stride
from clrjax.models.ssl_model import SSLModel, encoder_variables
from clrjax.models.vit import PATCH_SIZE, VIT_SPECS, ViT

ENCODER_NAMES = ("cnn_small", "resnet18", "resnet34", "resnet50",
                 "vit_tiny", "vit_small", "vit_base")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

_RESNET_DEFAULTS = {"cifar_stem": False, "width_multiplier": 1.0, "zero_init_residual": False}
# Keyword arguments each encoder accepts besides 'name' and 'dtype', with defaults.
ENCODER_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "cnn_small": {"widths": DEFAULT_WIDTHS, "stem_stride": 1},
    "resnet18": _RESNET_DEFAULTS,
    "resnet34": _RESNET_DEFAULTS,
    "resnet50": _RESNET_DEFAULTS,
    "vit_tiny": {"remat": False},
    "vit_small": {"remat": False},
    "vit_base": {"remat": False},
}

__all__ = [
    "ENCODER_NAMES", "DTYPES", "UnknownModelFieldError", "ENCODER_DEFAULTS", "resolve_model_config", "build_encoder",
    "num_features", "check_input_size", "build_projector", "build_ssl_model",
    "ResNet", "ViT", "SmallCNN", "Projector", "LinearProbe", "SSLModel", "encoder_variables",
]


# ---------------------------------------------------------------------------
# Validation of single fields: each returns the normalised value or raises.
# ---------------------------------------------------------------------------

class UnknownModelFieldError(ValueError):
    """A model config names a field its encoder does not take."""


def _as_dict(cfg: Any, what: str) -> Dict[str, Any]:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{what} must be a mapping (dict or ConfigDict), got {type(cfg).__name__}.")
    return dict(cfg)


def _check_bool(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"model config field '{field}' must be True or False, got {value!r}.")
    return value


def _check_positive_number(field: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"model config field '{field}' must be a positive number, got {value!r}.")
    return float(value)


def _check_positive_ints(field: str, value: Any, what: str = "model config") -> Tuple[int, ...]:
    ok = (isinstance(value, Sequence) and not isinstance(value, str)
          and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok:
        raise ValueError(f"{what} field '{field}' must be a list of positive integers, got {value!r}.")
    return tuple(int(v) for v in value)


def _check_stem_stride(field: str, value: Any) -> int:
    if isinstance(value, bool) or value not in (1, 2):
        raise ValueError(f"model config field '{field}' must be 1 or 2, got {value!r}.")
    return int(value)


def _check_widths(field: str, value: Any) -> Tuple[int, ...]:
    widths = _check_positive_ints(field, value)
    if not widths:
        raise ValueError(f"model config field '{field}' must list at least one width, got {value!r}.")
    return widths


_FIELD_CHECKS: Dict[str, Callable[[str, Any], Any]] = {
    "cifar_stem": _check_bool,
    "zero_init_residual": _check_bool,
    "remat": _check_bool,
    "width_multiplier": _check_positive_number,
    "widths": _check_widths,
    "stem_stride": _check_stem_stride,
}


def resolve_model_config(model_cfg: Mapping) -> Dict[str, Any]:
    """Validates an encoder config and fills in every default.

    Returns a plain, JSON-serialisable dict with 'name', 'dtype' and every
    keyword argument of that encoder. Raises ValueError (one sentence naming
    the field and the valid options) on an unknown name, unknown field or
    invalid value.
    """
    cfg = _as_dict(model_cfg, "model config")
    name = cfg.pop("name", None)
    if name not in ENCODER_DEFAULTS:
        raise ValueError(f"model config field 'name' is {name!r}, which is not an encoder; "
                         f"use one of {', '.join(ENCODER_NAMES)}.")
    dtype = cfg.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"model config field 'dtype' is {dtype!r}; use one of {', '.join(DTYPES)}.")
    defaults = ENCODER_DEFAULTS[name]
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise UnknownModelFieldError(f"model config field '{unknown[0]}' is not an option of '{name}'; "
                         f"valid fields are name, dtype, {', '.join(defaults)}.")
    resolved: Dict[str, Any] = {"name": name, "dtype": dtype}
    for field, default in defaults.items():
        resolved[field] = _FIELD_CHECKS[field](field, cfg.get(field, default))
    if "widths" in resolved:
        resolved["widths"] = list(resolved["widths"])  # JSON-friendly
    return resolved


# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------

def build_encoder(model_cfg: Mapping) -> nn.Module:
    """Returns the encoder module: ``__call__(x [B,H,W,C], train) -> float32 [B, F]``."""
    cfg = resolve_model_config(model_cfg)
    name, dtype = cfg["name"], DTYPES[cfg["dtype"]]
    if name == "cnn_small":
        return SmallCNN(widths=tuple(cfg["widths"]), stem_stride=cfg["stem_stride"], dtype=dtype)
    if name.startswith("resnet"):
        return ResNet(depth=int(name[len("resnet"):]), cifar_stem=cfg["cifar_stem"],
                      width_multiplier=cfg["width_multiplier"],
                      zero_init_residual=cfg["zero_init_residual"], dtype=dtype)
    dim, depth, heads = VIT_SPECS[name[len("vit_"):]]
    return ViT(dim=dim, depth=depth, num_heads=heads, remat=cfg["remat"], dtype=dtype)


def num_features(model_cfg: Mapping) -> int:
    """Feature dimension F of the encoder, without building or running it."""
    cfg = resolve_model_config(model_cfg)
    name = cfg["name"]
    if name == "cnn_small":
        return cfg["widths"][-1]
    if name.startswith("resnet"):
        return resnet_num_features(int(name[len("resnet"):]), cfg["width_multiplier"])
    return VIT_SPECS[name[len("vit_"):]][0]


def check_input_size(model_cfg: Mapping, image_size: Union[int, Sequence[int]]) -> None:
    """Raises ValueError when the encoder cannot take images of ``image_size`` (int or (H, W)).

    ViTs need H and W to be multiples of the patch size 16. Convolutional
    encoders need H, W at least their total stride (32 for a ResNet with the
    ImageNet stem, 8 with the CIFAR stem), so that the last feature map is
    not made of padding alone.
    """
    cfg = resolve_model_config(model_cfg)
    sizes = (image_size, image_size) if isinstance(image_size, numbers.Integral) else tuple(image_size)
    if len(sizes) != 2 or not all(isinstance(s, numbers.Integral) and s > 0 for s in sizes):
        raise ValueError(f"image_size must be a positive int or (height, width), got {image_size!r}.")
    name = cfg["name"]
    if name.startswith("vit"):
        if any(s % PATCH_SIZE for s in sizes):
            raise ValueError(f"'{name}' needs an image size divisible by its patch size {PATCH_SIZE}, "
                             f"got {image_size!r}; resize or crop to e.g. "
                             f"{max(PATCH_SIZE, PATCH_SIZE * round(min(sizes) / PATCH_SIZE))}.")
        return
    if name.startswith("resnet"):
        minimum = resnet_total_stride(cfg["cifar_stem"])
        hint = "" if cfg["cifar_stem"] else " or set cifar_stem=True for small images"
    else:
        minimum = cnn_total_stride(len(cfg["widths"]), cfg["stem_stride"])
        hint = " or use stem_stride=1" if cfg["stem_stride"] == 2 else ""
    if min(sizes) < minimum:
        raise ValueError(f"'{name}' downsamples by {minimum}, so images of size {image_size!r} are too "
                         f"small; use images of at least {minimum}x{minimum}{hint}.")


# ---------------------------------------------------------------------------
# Projector and SSL model
# ---------------------------------------------------------------------------

PROJECTOR_DEFAULTS = {"hidden_dims": (2048,), "out_dim": 128, "use_bn": True, "last_bn": False}


def build_projector(projector_cfg: Mapping, dtype: Any = jnp.float32) -> Projector:
    """Projector from {'hidden_dims', 'out_dim', 'use_bn', 'last_bn'} (defaults: PROJECTOR_DEFAULTS)."""
    cfg = _as_dict(projector_cfg, "projector config")
    unknown = sorted(set(cfg) - set(PROJECTOR_DEFAULTS))
    if unknown:
        raise ValueError(f"projector config field '{unknown[0]}' is unknown; "
                         f"valid fields are {', '.join(PROJECTOR_DEFAULTS)}.")
    cfg = {**PROJECTOR_DEFAULTS, **cfg}
    hidden = cfg["hidden_dims"]
    hidden = _check_positive_ints("hidden_dims", hidden, "projector config")
    out_dim = cfg["out_dim"]
    if isinstance(out_dim, bool) or not isinstance(out_dim, numbers.Integral) or out_dim <= 0:
        raise ValueError(f"projector config field 'out_dim' must be a positive integer, got {out_dim!r}.")
    for field in ("use_bn", "last_bn"):
        if not isinstance(cfg[field], bool):
            raise ValueError(f"projector config field '{field}' must be True or False, got {cfg[field]!r}.")
    return Projector(hidden_dims=hidden, out_dim=int(out_dim), use_bn=cfg["use_bn"],
                     last_bn=cfg["last_bn"], dtype=dtype)


def build_ssl_model(model_cfg: Mapping, projector_cfg: Mapping, num_classes: int) -> SSLModel:
    """SSLModel(encoder, projector, probe with ``num_classes``); the projector computes in the encoder's dtype."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
        raise ValueError(f"num_classes (of the online probe) must be a positive integer, got {num_classes!r}.")
    encoder = build_encoder(model_cfg)
    projector = build_projector(projector_cfg, dtype=encoder.dtype)
    return SSLModel(encoder=encoder, projector=projector, num_classes=int(num_classes))
