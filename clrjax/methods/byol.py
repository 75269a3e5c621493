"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent"): predict an EMA target's projection of the other view.

Networks (sec. 3.1): the online network is encoder f, projector g and
predictor q (``config.predictor``; ImageNet: 4096-256 as the projector,
sec. 3.3); the target network is an encoder and projector of the same
architecture whose parameters and BatchNorm statistics are the EMA of the
online ones, with tau from ``config.momentum.base`` (0.996) to 1 on the cosine
schedule tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (sec. 3.2). The
target is method state, runs in ``forward`` in training mode (batch
statistics, as the official code) and is updated in ``after_update``
(:mod:`clrjax.methods.momentum`). The online encoder is the one evaluated and
exported (``params['encoder']``); the target never is.

Loss (:func:`clrjax.losses.byol_loss`, eq. 2 symmetrised): the mean over the
global batch of (2 - 2 cos(q(z_a), t_b)) + (2 - 2 cos(q(z_b), t_a)), with
t the target's projections (stop-gradient).

Multi-crop (``config.augment.multicrop``): the online network runs on every
crop, the target only on the two global crops, and the loss is
:func:`clrjax.losses.multicrop.byol_multicrop_loss` over the crop pairs.
"""
from clrjax.losses.byol import byol_loss
from clrjax.losses.multicrop import byol_multicrop_loss
from clrjax.methods.momentum import PredictorMethod

METHOD = PredictorMethod(name="byol", loss_fn=byol_loss, loss_inputs=("predictions", "targets"),
                         supports_multicrop=True, multicrop_loss_fn=byol_multicrop_loss,
                         source="Grill et al. 2020, sec. 3.1 eq. 2 (loss), sec. 3.2 (momentum schedule)")
