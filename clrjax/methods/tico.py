"""TiCo (Zhu et al. 2022): invariance plus a contrast against a running covariance.

The running covariance ``cov`` [d, d] (d = ``config.projector.out_dim``,
zeros at step 0) is method state: carried in the train state, checkpointed,
and updated by the loss (:func:`clrjax.losses.tico_loss`) from the global batch.
"""
import dataclasses

import jax.numpy as jnp

from clrjax.losses.tico import tico_loss
from clrjax.methods.base import Method


@dataclasses.dataclass(frozen=True)
class TiCo(Method):
    def init_state(self, config, variables):
        dim = int(config.projector.out_dim)
        return {"cov": jnp.zeros((dim, dim), jnp.float32)}

    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        del batch
        z = outputs["embeddings"]
        loss, new_cov, metrics = tico_loss(z[:, 0], z[:, 1], state["cov"], axis_name=axis_name, **loss_kwargs)
        return loss, {"cov": new_cov}, metrics


METHOD = TiCo(name="tico", loss_fn=tico_loss, source="Zhu et al. 2022, sec. 3 and Algorithm 1")
