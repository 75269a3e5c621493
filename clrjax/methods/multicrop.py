"""Multi-crop views and their forward pass, shared by every method that supports multi-crop.

Multi-crop (Caron et al. 2020, "Unsupervised Learning of Visual Features by
Contrasting Cluster Assignments" (SwAV), sec. 3.2): besides the two usual
views ("global crops", ``augment.crop_size`` px, area fraction
``augment.multicrop.global_scale``; SwAV: 224 px, (0.14, 1)) each image gets
V = ``augment.multicrop.num_local`` small "local crops" (``local_size`` px,
area fraction ``local_scale``; SwAV: 96 px, (0.05, 0.14)). The global crops
are the targets; every crop is compared with the global crop(s) of the other
views (crop j against global crop i for i != j: SwAV sec. 3.2 "we only use
the ... full resolution crops to compute the codes"; DINO, Caron et al.
2021, sec. 3.1 eq. 3). The losses are in :mod:`clrjax.losses.multicrop`.

Views (:func:`make_views`): ``{'global': [B, 2, S, S, C], 'local': [B, V,
s, s, C]}``, leading axis B everywhere, so gradient caching splits it by rows
like any view pytree. Global crop v in {0, 1} is exactly view v of
:func:`clrjax.data.augment.views` (same key ``fold_in(fold_in(key, index),
v)``, the per-view blur and solarisation probabilities of ``augment``) except
that its area fraction is ``global_scale``; local crop j uses the fold
``2 + j``, so every crop of every example has its own key and the views do
not depend on the device count. Local crops are blurred with probability
``local_blur_prob`` and solarised with ``local_solarize_prob`` (defaults 0.5
and 0: the official SwAV code, ``src/multicropdataset.py``, blurs every
crop with p = 0.5 and never solarises; DINO's ``main_dino.py``
``DataAugmentationDINO`` does the same for its local crops), with a blur
kernel sized for the local crop (``augment.blur_radius(local_size)``).
With ``num_local = 0`` multi-crop is off and none of this runs: the method's
views are the two views of ``augment.views``, bit for bit.

Forward (:func:`forward`): as the official code (SwAV ``src/resnet50.py``
``ResNet.forward`` and DINO's ``MultiCropWrapper``), each resolution goes
through the *encoder* as its own batch - the global crops of the whole
batch together, then the local crops together - so BatchNorm normalises each
resolution with its own batch statistics and the running statistics are
updated once per resolution, in that order; the heads (projector,
predictor, online probe) then run once on the features of all crops
concatenated. A ViT interpolates its position embeddings to the local
crops' patch grid (:mod:`clrjax.models.vit`).

A new method supports multi-crop by setting ``supports_multicrop=True`` and
making its ``loss`` accept ``[B, 2 + V, d]`` outputs (crops 0 and 1 are the
global ones); ``Method.make_views`` and ``Method.forward`` already dispatch
here, and a momentum method's target runs on the global crops only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Tuple

import jax
import jax.numpy as jnp

NUM_GLOBAL = 2


@dataclasses.dataclass(frozen=True)
class MultiCrop:
    """``augment.multicrop`` as plain Python values."""
    num_local: int
    local_size: int
    local_scale: Tuple[float, float]
    global_scale: Tuple[float, float]
    local_blur_prob: float
    local_solarize_prob: float


def settings(augment_config: Mapping[str, Any]):
    """The :class:`MultiCrop` settings of ``augment_config``, or None when multi-crop is off."""
    mc = augment_config.get("multicrop") if hasattr(augment_config, "get") else None
    if not mc or int(mc["num_local"]) == 0:
        return None
    return MultiCrop(num_local=int(mc["num_local"]), local_size=int(mc["local_size"]),
                     local_scale=tuple(float(v) for v in mc["local_scale"]),
                     global_scale=tuple(float(v) for v in mc["global_scale"]),
                     local_blur_prob=float(mc["local_blur_prob"]),
                     local_solarize_prob=float(mc["local_solarize_prob"]))


def is_multicrop(views) -> bool:
    """Whether ``views`` are multi-crop views (a dict with a 'local' entry)."""
    return isinstance(views, Mapping) and "local" in views


def global_views(views):
    """The global crops [B, 2, S, S, C] of multi-crop views; plain views as they are."""
    return views["global"] if is_multicrop(views) else views


def _crop_configs(augment_config: Mapping[str, Any], mc: MultiCrop):
    """(global, local) augment configs: per-view probabilities indexed by crop number 0..2+V-1."""
    base = {k: v for k, v in dict(augment_config).items() if k != "multicrop"}
    total = NUM_GLOBAL + mc.num_local

    def per_crop(field, local_value):
        value = base[field]
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * NUM_GLOBAL
        return tuple(float(v) for v in value[:NUM_GLOBAL]) + (local_value,) * (total - NUM_GLOBAL)

    probs = {"blur_prob": per_crop("blur_prob", mc.local_blur_prob),
             "solarize_prob": per_crop("solarize_prob", mc.local_solarize_prob)}
    global_cfg = dict(base, crop_scale=mc.global_scale, **probs)
    local_cfg = dict(base, crop_size=mc.local_size, crop_scale=mc.local_scale, **probs)
    return global_cfg, local_cfg


def make_views(examples, key, augment_config, mc: MultiCrop):
    """{'global': [B, 2, S, S, C], 'local': [B, V, s, s, C]}: see the module docstring."""
    from clrjax.data import augment  # local: keeps the method modules light

    images, index = examples["image"], examples["index"]
    global_cfg, local_cfg = _crop_configs(augment_config, mc)
    global_crops = [augment.augment_batch(images, index, key, global_cfg, v) for v in range(NUM_GLOBAL)]
    local_crops = [augment.augment_batch(images, index, key, local_cfg, NUM_GLOBAL + j)
                   for j in range(mc.num_local)]
    return {"global": jnp.stack(global_crops, axis=1), "local": jnp.stack(local_crops, axis=1)}


def _encode(module, x, train):
    return module.encoder(x, train=train)


def _heads(module, h, train):
    """The SSLModel's heads on encoder features h [n, F] (projector [, predictor], probe)."""
    out = {"features": h, "embeddings": module.projector(h, train=train)}
    if module.predictor is not None:
        out["predictions"] = module.predictor(out["embeddings"], train=train)
    out["probe_logits"] = module.probe(jax.lax.stop_gradient(h))
    return out


def _apply(model, variables, x, train, fn):
    """``fn`` of the model on x -> (output, batch_stats after it): batch statistics in training."""
    if train:
        out, mutated = model.apply(variables, x, train, method=fn, mutable=["batch_stats"])
        return out, mutated.get("batch_stats", {})
    return model.apply(variables, x, train, method=fn), variables.get("batch_stats", {})


def _flat(x):
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def forward(model, variables, views, *, train: bool):
    """Multi-crop views -> (outputs [B, 2 + V, ...], batch_stats): encoder per resolution, heads once.

    Crops 0 and 1 of every output are the global crops, 2.. the local ones.
    The running BatchNorm statistics are threaded through the three applies
    (global encoder pass, local encoder pass, heads), as the official code's
    consecutive forward calls update them.
    """
    b = views["global"].shape[0]
    batch_stats = variables.get("batch_stats", {})
    features = []
    for name in ("global", "local"):
        h, batch_stats = _apply(model, dict(variables, batch_stats=batch_stats), _flat(views[name]), train,
                                _encode)
        features.append(h.reshape((b, views[name].shape[1]) + h.shape[1:]))
    h = jnp.concatenate(features, axis=1)                                   # [B, 2 + V, F]
    out, batch_stats = _apply(model, dict(variables, batch_stats=batch_stats), _flat(h), train, _heads)
    return jax.tree.map(lambda x: x.reshape((b, h.shape[1]) + x.shape[1:]), out), batch_stats
