"""VICReg (Bardes et al. 2022): variance, invariance and covariance terms on two views.

The loss is :func:`clrjax.losses.vicreg_loss`; everything else is the interface's default.
"""
from clrjax.losses.vicreg import vicreg_loss
from clrjax.methods.base import Method

METHOD = Method(name="vicreg", loss_fn=vicreg_loss, source="Bardes et al. 2022, eqs. 1-6")
