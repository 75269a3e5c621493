"""Supervised baseline: the encoder trained with cross-entropy on the labels, on the same interface.

The networks are the encoder and a classifier head in place of the projector:
``config.projector.hidden_dims`` hidden layers (``()`` for a linear
classifier; BatchNorm per ``config.projector.use_bn``) and an output layer of
one logit per class (``config.projector.out_dim`` is not used). Both
augmented views are classified (:func:`clrjax.losses.supervised_ce_loss`), so
the baseline sees exactly the images, augmentations and steps of the
self-supervised run it is compared with. The online probe still trains on
the stop-gradient features, as for every method.
"""
import dataclasses

from clrjax.losses.supervised import supervised_ce_loss
from clrjax.methods.base import Method


@dataclasses.dataclass(frozen=True)
class Supervised(Method):
    def build_model(self, config, num_classes: int):
        from clrjax import models
        head = dict(config.projector.to_dict(), out_dim=int(num_classes), last_bn=False)
        return models.build_ssl_model(config.model.to_dict(), head, num_classes)

    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        logits = outputs["embeddings"]
        loss, metrics = supervised_ce_loss(logits[:, 0], logits[:, 1], batch["label"],
                                           axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics


METHOD = Supervised(name="supervised", loss_fn=supervised_ce_loss, uses_labels=True,
                    source="softmax cross-entropy; label smoothing: Szegedy et al. 2016, sec. 7")
