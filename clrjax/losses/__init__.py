"""Contrastive and self-supervised losses, each exact on any number of devices.

Every loss is a plain function of this shard's rows: it takes the local
``[n_local, d]`` embeddings (and, where the method needs them, labels or
state) and an ``axis_name`` (None on one device), gathers or reduces across
that axis exactly where the mathematics needs the global batch, and returns
the loss of the global batch (docs/DESIGN.md, "One idea")::

    loss, metrics = simclr_loss(z_a, z_b, temperature=0.1, axis_name='data')
    loss, new_cov, metrics = tico_loss(z_a, z_b, cov, axis_name='data')
    loss, metrics = supcon_loss(z_a, z_b, labels, axis_name='data')
    loss, metrics = clip_loss(img, txt, logit_scale, axis_name='data')
    loss, metrics = siglip_loss(img, txt, log_t, bias, axis_name='data')

How a loss becomes a trainable method (views, networks, state) is the
method registry's business: :mod:`clrjax.methods`.
"""
from clrjax.losses.barlow_twins import barlow_twins_loss
from clrjax.losses.byol import byol_loss
from clrjax.losses.clip import clip_loss
from clrjax.losses.moco_v2 import moco_v2_loss
from clrjax.losses.moco_v3 import moco_v3_loss
from clrjax.losses.siglip import siglip_loss
from clrjax.losses.simclr import simclr_loss
from clrjax.losses.supcon import supcon_loss
from clrjax.losses.supervised import supervised_ce_loss
from clrjax.losses.tico import tico_loss
from clrjax.losses.vicreg import vicreg_loss

__all__ = [
    "barlow_twins_loss",
    "byol_loss",
    "clip_loss",
    "moco_v2_loss",
    "moco_v3_loss",
    "siglip_loss",
    "simclr_loss",
    "supcon_loss",
    "supervised_ce_loss",
    "tico_loss",
    "vicreg_loss",
]
