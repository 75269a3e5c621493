"""MoCo v2 (Chen et al. 2020, on He et al. 2019): queries against the momentum key and a queue of past keys.

Networks: encoder and projector (MoCo v2's MLP head, ``config.projector``);
the momentum ("key") encoder is their EMA (parameters and BatchNorm
statistics) with a constant momentum ``config.momentum.base`` (0.999,
He et al. 2019 sec. 3.2; ``config.momentum.final`` = base), via
:mod:`clrjax.methods.momentum` shared with BYOL and MoCo v3. It runs in
``forward`` in training mode on the global batch (the global-batch BatchNorm
plays the part of the official code's shuffling BN: statistics over all
devices' rows, not one device's). The online encoder is evaluated and
exported.

State: ``queue`` [K, d] (``config.queue.size`` unit keys, random unit vectors
at step 0 from ``config.seed``, as the official code's normalised randn) and
``queue_ptr``, replicated, checkpointed. Loss and update:
:func:`clrjax.losses.moco_v2_loss` (queries = online embeddings of view a,
keys = momentum embeddings of view b, negatives = the queue before this
step) and :func:`clrjax.losses.moco_v2.enqueue` (the global batch's keys in
global example order replace the oldest N rows), so the queue is the same on
any device count and after a resume. ``config.queue.size`` must be a multiple
of ``config.batch_size``.
"""
import dataclasses

import jax
import jax.numpy as jnp

from clrjax.losses.moco_v2 import enqueue, moco_v2_loss
from clrjax.methods.momentum import MomentumMethod

QUEUE_SEED_SALT = 0x4D6F436F  # 'MoCo': the queue's key is fold_in(PRNGKey(seed), salt)


@dataclasses.dataclass(frozen=True)
class MoCoV2(MomentumMethod):
    def init_state(self, config, variables):
        state = super().init_state(config, variables)
        key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), QUEUE_SEED_SALT)
        queue = jax.random.normal(key, (int(config.queue.size), int(config.projector.out_dim)), jnp.float32)
        queue = queue / jnp.linalg.norm(queue, axis=1, keepdims=True)
        return dict(state, queue=queue, queue_ptr=jnp.zeros((), jnp.int32))

    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        del batch
        q, k = outputs["embeddings"][:, 0], outputs["targets"][:, 1]
        loss, metrics = moco_v2_loss(q, k, state["queue"], axis_name=axis_name, **loss_kwargs)
        queue, ptr = enqueue(state["queue"], state["queue_ptr"], k, axis_name=axis_name)
        return loss, dict(state, queue=queue, queue_ptr=ptr), metrics

    def validate(self, config) -> None:
        super().validate(config)
        from clrjax.config import ConfigError

        size, batch = config.queue.size, config.batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % batch:
            multiple = batch * max(1, round(size / batch)) if isinstance(size, (int, float)) and size > 0 else batch
            raise ConfigError(f"config.queue.size is {size!r}, which is not a positive multiple of the global "
                              f"batch (config.batch_size = {batch}); set --config.queue.size to a multiple of "
                              f"{batch} such as {multiple}.")


METHOD = MoCoV2(name="moco_v2", loss_fn=moco_v2_loss, loss_inputs=("embeddings", "targets"),
                source="He et al. 2019, eq. 1 and Algorithm 1; Chen et al. 2020 (MoCo v2)")
