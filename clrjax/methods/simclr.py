"""SimCLR (Chen et al. 2020) and DCL (Yeh et al. 2022, ``decoupled=True``): NT-Xent on two views.

The loss is :func:`clrjax.losses.simclr_loss`; everything else is the interface's default.
"""
from clrjax.losses.simclr import simclr_loss
from clrjax.methods.base import Method

METHOD = Method(name="simclr", loss_fn=simclr_loss,
                source="Chen et al. 2020, eq. 1; DCL: Yeh et al. 2022, eq. 6")
