"""MoCo v3 (Chen, Xie & He 2021): online queries against momentum keys of the global batch.

Networks (sec. 3 and the official ``moco/builder.py``): the online network is
encoder, projector and predictor (``config.predictor``); the momentum
encoder is an encoder and projector of the same architecture whose
parameters and BatchNorm statistics are the EMA of the online ones, with
momentum from ``config.momentum.base`` (0.99) to 1 on a cosine schedule
(sec. 4, "Momentum coefficient"; the official code steps it per epoch, clrjax
per step with :mod:`clrjax.methods.momentum`, shared with BYOL). It is method
state, runs in ``forward`` in training mode (batch statistics of the global
batch, as the official code's SyncBN) and is updated in ``after_update``. The
online encoder is what is evaluated and exported.

Loss (:func:`clrjax.losses.moco_v3_loss`): ctr(q_a, k_b) + ctr(q_b, k_a), the
InfoNCE of each online prediction against the momentum keys of the other view
of the whole global batch (all-gathered; negatives = the global batch),
temperature ``config.loss.temperature``, scaled by 2T as in the official code.
No memory queue (that is MoCo v2).

Multi-crop (``config.augment.multicrop``): queries from every crop, keys from
the momentum encoder on the two global crops only, all-gathered;
:func:`clrjax.losses.multicrop.moco_v3_multicrop_loss` over the crop pairs.
"""
from clrjax.losses.moco_v3 import moco_v3_loss
from clrjax.losses.multicrop import moco_v3_multicrop_loss
from clrjax.methods.momentum import PredictorMethod

METHOD = PredictorMethod(name="moco_v3", loss_fn=moco_v3_loss, loss_inputs=("predictions", "targets"),
                         supports_multicrop=True, multicrop_loss_fn=moco_v3_multicrop_loss,
                         source="Chen, Xie & He 2021, sec. 3 Algorithm 1; momentum: sec. 4")
