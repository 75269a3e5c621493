"""Supervised Contrastive learning (Khosla et al. 2020, eq. 2, L_out): every view of the same class is a positive.

Two augmented views per image, as SimCLR; the loss
(:func:`clrjax.losses.supcon_loss`) also reads the batch's labels, gathered
with the embeddings over the global batch.
"""
import dataclasses

from clrjax.losses.supcon import supcon_loss
from clrjax.methods.base import Method


@dataclasses.dataclass(frozen=True)
class SupCon(Method):
    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        z = outputs["embeddings"]
        loss, metrics = supcon_loss(z[:, 0], z[:, 1], batch["label"], axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics


METHOD = SupCon(name="supcon", loss_fn=supcon_loss, uses_labels=True, source="Khosla et al. 2020, eq. 2")
