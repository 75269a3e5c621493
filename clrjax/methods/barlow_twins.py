"""Barlow Twins (Zbontar et al. 2021): cross-correlation of two views towards the identity.

The loss is :func:`clrjax.losses.barlow_twins_loss`; everything else is the interface's default.
"""
from clrjax.losses.barlow_twins import barlow_twins_loss
from clrjax.methods.base import Method

METHOD = Method(name="barlow_twins", loss_fn=barlow_twins_loss, source="Zbontar et al. 2021, eq. 1")
