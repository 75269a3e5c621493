"""A method defined outside clrjax in one file: online embeddings against an EMA target network.

Used by tests/test_plugins.py by its module path (``method=tests.plugins.ema_cosine``):
the networks' target copy lives in the method state, runs in ``forward``
and is updated in ``after_update``, which is the shape of BYOL or MoCo.
Loss: mean over the global batch of 2 - 2 cos(z_a, t_b) - 2 cos(z_b, t_a),
with t the target's embeddings (no gradient).
"""
import dataclasses

import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.methods import Method

TAU = 0.9  # target <- TAU * target + (1 - TAU) * online


def ema_cosine_loss(z_a, z_b, t_a, t_b, *, axis_name=None):
    def cos(u, v):
        u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        return jnp.sum(u * jax.lax.stop_gradient(v), axis=-1)
    n = col.global_batch_size(z_a.shape[0], axis_name)
    loss = col.psum(jnp.sum(4.0 - 2.0 * cos(z_a, t_b) - 2.0 * cos(z_b, t_a)), axis_name) / n
    return loss, {}


@dataclasses.dataclass(frozen=True)
class EmaCosine(Method):
    def init_state(self, config, variables):
        return {"target": jax.tree.map(jnp.copy, variables["params"])}  # the target starts as the online networks

    def forward(self, model, variables, views, state, *, train):
        outputs, batch_stats = super().forward(model, variables, views, state, train=train)
        target_params = jax.lax.stop_gradient(state["target"])
        target, _ = super().forward(model, {"params": target_params, "batch_stats": variables["batch_stats"]},
                                    views, state, train=False)
        outputs["target"] = target["embeddings"]
        return outputs, batch_stats

    def loss(self, outputs, batch, state, *, axis_name=None, **kw):
        z, t = outputs["embeddings"], outputs["target"]
        loss, metrics = ema_cosine_loss(z[:, 0], z[:, 1], t[:, 0], t[:, 1], axis_name=axis_name, **kw)
        return loss, state, metrics

    def after_update(self, state, *, params, batch_stats, step, total_steps):
        return {"target": jax.tree.map(lambda t, p: TAU * t + (1.0 - TAU) * p, state["target"], params)}


METHOD = EmaCosine(name="ema_cosine", loss_fn=ema_cosine_loss, loss_inputs=("embeddings", "target"))
