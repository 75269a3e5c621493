"""SigLIP (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training").

The two towers of :mod:`clrjax.methods.image_text` trained with the pairwise
sigmoid loss of the global batch, :func:`clrjax.losses.siglip_loss` (eq. 1,
Algorithm 1; text blocks travel round the devices), with the learnable
temperature t = exp('log_t') and bias 'bias', initialised at t' = log 10 and
b = -10 (sec. 3.2). LiT-style locking: ``image_tower.init_from`` +
``image_tower.locked`` (see image_text.py).
"""
import dataclasses

from clrjax.losses.siglip import INIT_BIAS, INIT_LOG_T, siglip_loss
from clrjax.methods.image_text import ImageTextMethod, pairs_of, scalars_of


@dataclasses.dataclass(frozen=True)
class SigLip(ImageTextMethod):
    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        del batch
        img, txt = pairs_of(outputs)
        log_t, bias = scalars_of(outputs, 2, axis_name)
        loss, metrics = siglip_loss(img, txt, log_t, bias, axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics


METHOD = SigLip(name="siglip", loss_fn=siglip_loss, scalar_inits=(("log_t", INIT_LOG_T), ("bias", INIT_BIAS)),
                source="Zhai et al. 2023, eq. 1, Algorithm 1, sec. 3.2")
