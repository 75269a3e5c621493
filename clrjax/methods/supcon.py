"""Supervised Contrastive learning (Khosla et al. 2020, eq. 2, L_out): every view of the same class is a positive.

Two augmented views per image, as SimCLR; the loss
(:func:`clrjax.losses.supcon_loss`) also reads the batch's labels, gathered
with the embeddings over the global batch. Multi-crop
(``config.augment.multicrop``): :func:`clrjax.losses.multicrop.multicrop_contrastive_loss`
with the labels (every crop an anchor, the global crops of its class the positives).
"""
import dataclasses

from clrjax.losses.multicrop import NUM_GLOBAL, multicrop_contrastive_loss
from clrjax.losses.supcon import supcon_loss
from clrjax.methods.base import Method
from clrjax.methods.simclr import check_dense_multicrop


@dataclasses.dataclass(frozen=True)
class SupCon(Method):
    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        z = outputs["embeddings"]
        if z.shape[1] > NUM_GLOBAL:
            loss, metrics = multicrop_contrastive_loss(z, batch["label"], axis_name=axis_name, **loss_kwargs)
            return loss, state, metrics
        loss, metrics = supcon_loss(z[:, 0], z[:, 1], batch["label"], axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics

    def validate(self, config) -> None:
        check_dense_multicrop(config)


METHOD = SupCon(name="supcon", loss_fn=supcon_loss, uses_labels=True, supports_multicrop=True,
                source="Khosla et al. 2020, eq. 2")
