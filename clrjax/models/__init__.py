"""Models: encoders by name (the registry in ``encoders.py``), the projector, and the SSL model.

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

Each encoder's fields and defaults are owned by its registry entry
(``ENCODER = Encoder(...)`` at the end of ``cnn.py``, ``resnet.py``,
``vit.py``); this table lists the built-in ones.

Public API: ``ENCODERS`` / ``encoder_names()``, ``resolve_model_config``, ``build_encoder``,
``num_features``, ``check_input_size``, ``build_projector``,
``build_ssl_model``, ``encoder_variables`` (the SSL model's 'encoder' subtree,
what :func:`clrjax.export.export_encoder` takes).
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from clrjax.models.cnn import SmallCNN
from clrjax.models.encoders import ENCODERS, Encoder, as_sizes, check_positive_ints
from clrjax.models.heads import LinearProbe, Projector
from clrjax.models.resnet import ResNet
from clrjax.models.ssl_model import SSLModel, encoder_variables
from clrjax.models.vit import ViT

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "ENCODERS", "Encoder", "DTYPES", "UnknownModelFieldError", "encoder_names", "resolve_model_config",
    "build_encoder", "num_features", "check_input_size", "build_projector", "build_ssl_model",
"ResNet", "ViT", "SmallCNN", "Projector", "LinearProbe", "SSLModel",
    "encoder_variables",
]


class UnknownModelFieldError(ValueError):
    """A model config names a field its encoder does not take."""


def encoder_names() -> Tuple[str, ...]:
    """Names of the registered encoders."""
    return ENCODERS.names()


def _as_dict(cfg: Any, what: str) -> Dict[str, Any]:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        cfg = cfg.to_dict()
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{what} must be a mapping (dict or ConfigDict), got {type(cfg).__name__}.")
    return dict(cfg)


def _entry(name: Any) -> Encoder:
    if name not in ENCODERS:
        raise ValueError(f"model config field 'name' is {name!r}, which is not an encoder; "
                         f"use one of {', '.join(encoder_names())}.")
    return ENCODERS.get(name)


def resolve_model_config(model_cfg: Mapping) -> Dict[str, Any]:
    """Validates an encoder config and fills in every default.

    Returns a plain, JSON-serialisable dict with 'name', 'dtype' and every
    keyword argument of that encoder. Raises ValueError (one sentence naming
    the field and the valid options) on an unknown name, unknown field or
    invalid value.
    """
    cfg = _as_dict(model_cfg, "model config")
    name = cfg.pop("name", None)
    entry = _entry(name)
    dtype = cfg.pop("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"model config field 'dtype' is {dtype!r}; use one of {', '.join(DTYPES)}.")
    unknown = sorted(set(cfg) - set(entry.defaults))
    if unknown:
        raise UnknownModelFieldError(f"model config field '{unknown[0]}' is not an option of '{name}'; "
                                     f"valid fields are name, dtype, {', '.join(entry.defaults)}.")
    resolved: Dict[str, Any] = {"name": name, "dtype": dtype}
    for field, default in entry.defaults.items():
        resolved[field] = entry.check_field(field, cfg.get(field, default))
    # JSON-friendly: tuples become lists, as config.json and export metadata store them.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


# ---------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------

def build_encoder(model_cfg: Mapping) -> nn.Module:
    """Returns the encoder module: ``__call__(x [B,H,W,C], train) -> float32 [B, F]``."""
    cfg = resolve_model_config(model_cfg)
    return _entry(cfg["name"]).build(cfg, DTYPES[cfg["dtype"]])


def num_features(model_cfg: Mapping) -> int:
    """Feature dimension F of the encoder, without building or running it."""
    cfg = resolve_model_config(model_cfg)
    return int(_entry(cfg["name"]).num_features(cfg))


def check_input_size(model_cfg: Mapping, image_size: Union[int, Sequence[int]]) -> None:
    """Raises ValueError when the encoder cannot take images of ``image_size`` (int or (H, W)).

    Each encoder states its own limit (``Encoder.check_input``): ViTs need H
    and W to be multiples of the patch size 16; convolutional encoders need
    H, W at least their total stride (32 for a ResNet with the ImageNet stem,
    8 with the CIFAR stem), so that the last feature map is not made of
    padding alone.
    """
    cfg = resolve_model_config(model_cfg)
    as_sizes(image_size)
    _entry(cfg["name"]).check_input(cfg, image_size)


# ---------------------------------------------------------------------------
# Projector and SSL model
# ---------------------------------------------------------------------------

PROJECTOR_FIELDS = ("hidden_dims", "out_dim", "use_bn", "last_bn")


def build_projector(projector_cfg: Mapping, dtype: Any = jnp.float32) -> Projector:
    """Projector from ``{'hidden_dims', 'out_dim', 'use_bn', 'last_bn'}``, every field given.

    The defaults live in the config (``clrjax.config.base_config().projector``).
    """
    cfg = _as_dict(projector_cfg, "projector config")
    unknown = sorted(set(cfg) - set(PROJECTOR_FIELDS))
    if unknown:
        raise ValueError(f"projector config field '{unknown[0]}' is unknown; "
                         f"valid fields are {', '.join(PROJECTOR_FIELDS)}.")
    missing = [f for f in PROJECTOR_FIELDS if f not in cfg]
    if missing:
        raise ValueError(f"projector config field '{missing[0]}' is missing; give all of "
                         f"{', '.join(PROJECTOR_FIELDS)} (clrjax.config.base_config().projector has them).")
    hidden = cfg["hidden_dims"]
    hidden = check_positive_ints("hidden_dims", hidden, "projector config")
    out_dim = cfg["out_dim"]
    if isinstance(out_dim, bool) or not isinstance(out_dim, numbers.Integral) or out_dim <= 0:
        raise ValueError(f"projector config field 'out_dim' must be a positive integer, got {out_dim!r}.")
    for field in ("use_bn", "last_bn"):
        if not isinstance(cfg[field], bool):
            raise ValueError(f"projector config field '{field}' must be True or False, got {cfg[field]!r}.")
    return Projector(hidden_dims=hidden, out_dim=int(out_dim), use_bn=cfg["use_bn"],
                     last_bn=cfg["last_bn"], dtype=dtype)


def build_ssl_model(model_cfg: Mapping, projector_cfg: Mapping, num_classes: int,
                    predictor_cfg: Optional[Mapping] = None) -> SSLModel:
    """SSLModel(encoder, projector, probe with ``num_classes`` [, predictor from ``predictor_cfg``,
    the projector's fields]); the heads compute in the encoder's dtype."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes <= 0:
        raise ValueError(f"num_classes (of the online probe) must be a positive integer, got {num_classes!r}.")
    dtype = DTYPES[resolve_model_config(model_cfg)["dtype"]]
    predictor = None if predictor_cfg is None else build_projector(predictor_cfg, dtype=dtype)
    return SSLModel(encoder=build_encoder(model_cfg), projector=build_projector(projector_cfg, dtype=dtype),
                    num_classes=int(num_classes), predictor=predictor)
