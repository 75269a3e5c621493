"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision").

Two towers (:mod:`clrjax.methods.image_text`: any clrjax image encoder and a
CLIP-layout text Transformer, each with a linear projection to the joint
space, sec. 2.4) trained with the symmetric InfoNCE of the global batch,
:func:`clrjax.losses.clip_loss` (sec. 2.3, Figure 3), whose learnable
temperature is the parameter 'logit_scale', initialised at log(1 / 0.07) and
capped at a multiplier of 100 (sec. 2.5). LiT (locked image tower) is
``image_tower.init_from`` + ``image_tower.locked`` (see image_text.py).
"""
import dataclasses

from clrjax.losses.clip import INIT_LOGIT_SCALE, clip_loss
from clrjax.methods.image_text import ImageTextMethod, pairs_of, scalars_of


@dataclasses.dataclass(frozen=True)
class Clip(ImageTextMethod):
    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        del batch
        img, txt = pairs_of(outputs)
        (logit_scale,) = scalars_of(outputs, 1, axis_name)
        loss, metrics = clip_loss(img, txt, logit_scale, axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics


METHOD = Clip(name="clip", loss_fn=clip_loss, scalar_inits=(("logit_scale", INIT_LOGIT_SCALE),),
              source="Radford et al. 2021, sec. 2.3-2.5 and Figure 3")
