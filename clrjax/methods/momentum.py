"""Momentum (EMA) target networks, shared by BYOL and MoCo: state, forward, update, schedule.

A :class:`MomentumMethod` trains an online network (encoder + projector
[+ predictor]) against a *target* network of the same encoder + projector
architecture whose variables are an exponential moving average of the
online ones (BYOL, Grill et al. 2020, sec. 3.1; MoCo, He et al. 2019, eq. 2):

    xi <- tau_k * xi + (1 - tau_k) * theta            after every update,

with theta the online variables just produced by the optimizer step and
``tau_k`` the momentum of update k (k = 0, 1, ... counts the steps completed
before it; the trainer's ``after_update`` receives ``step = k + 1``):

    tau_k = final - (final - base) * (cos(pi k / K) + 1) / 2,    K = total steps.

``final = 1`` is BYOL's schedule (sec. 3.2: tau from tau_base to 1; the
official ``byol/utils/schedules.py`` ``target_ema`` evaluates it at the
global step before the update, as here) and MoCo v3's (sec. 4, "momentum
coefficient ... increased to 1 with a cosine schedule"); ``final = base`` is
MoCo v2's constant momentum. ``base`` and ``final`` come from
``config.momentum``.

What is averaged: the 'encoder' and 'projector' subtrees of both the
parameters *and* the BatchNorm running statistics (the online predictor and
probe have no target counterpart). The target lives in the method state
(``state['target'] = {'params', 'batch_stats'}``), never in ``params``: it has
no optimizer state, receives no gradient (``stop_gradient`` in
:meth:`MomentumMethod.forward` and in the losses), is checkpointed with the
state, and ``params['encoder']`` - what is evaluated and exported - is always
the online encoder.

BatchNorm of the target: the target runs in *training* mode, i.e. it
normalises with the statistics of the current batch (all views of the global
batch, like the online network), as the official BYOL code does
(``byol_experiment.py``, ``loss_fn``: the target network is applied with
``is_training=True``) and MoCo v3 does with its SyncBN key encoder. The
running statistics that this forward would produce are discarded, so they
never leak into the online ``batch_stats``; the target's own running
statistics are instead the EMA of the online ones (they are not read during
training, only by an inference-mode use of the target such as exporting it).
The official BYOL code keeps the target's running statistics from its own
forward passes; they matter only at inference, which BYOL never does with
the target.

At step 0 the target equals the online networks (parameters and BatchNorm
statistics copied from the initial variables that ``init_state`` receives).

``base`` and ``final`` are kept in the method state (``state['momentum']``),
because ``after_update`` sees no config; they are set from ``config.momentum``
at step 0, and a resumed run keeps the values it started with.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from clrjax.methods import multicrop
from clrjax.methods.base import Method

TARGET_MODULES = ("encoder", "projector")


def momentum_at(k, total_steps: int, base, final=1.0):
    """tau_k = final - (final - base) (cos(pi k / K) + 1) / 2, k clipped to [0, K]; float32."""
    k = jnp.clip(jnp.asarray(k, jnp.float32), 0.0, float(total_steps))
    progress = (jnp.cos(math.pi * k / float(max(total_steps, 1))) + 1.0) / 2.0
    base, final = jnp.asarray(base, jnp.float32), jnp.asarray(final, jnp.float32)
    return final - (final - base) * progress


def ema(target, online, tau):
    """tau * target + (1 - tau) * online, leaf by leaf (same tree structure).

    Computed as target + (1 - tau) * (online - target): the same value, but a leaf
    that equals its online twin stays bit-identical (a frozen parameter such as
    MoCo v3's patch embedding, ``config.optimizer.freeze``), where the two-product
    form could move it by a rounding error each step.
    """
    return jax.tree.map(lambda t, o: t + (1.0 - tau) * (o.astype(t.dtype) - t), target, online)


def target_subtrees(tree):
    """The 'encoder' and 'projector' subtrees of a variable collection (those present)."""
    return {name: tree[name] for name in TARGET_MODULES if name in tree}


def _target_apply(module, x, train):
    return module.project(x, train)["embeddings"]


def check_momentum_config(config) -> None:
    """``config.momentum.base`` in [0, 1) and ``final`` in [base, 1], else one-sentence ConfigError."""
    from clrjax.config import ConfigError

    base, final = config.momentum.base, config.momentum.final
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0.0 <= base < 1.0:
        raise ConfigError(f"config.momentum.base is {base!r} but the target momentum must lie in [0, 1); "
                          f"set --config.momentum.base to a value such as 0.996 ({config.method}).")
    if isinstance(final, bool) or not isinstance(final, (int, float)) or not base <= final <= 1.0:
        raise ConfigError(f"config.momentum.final is {final!r} but must lie in [momentum.base, 1] = [{base}, 1]; "
                          "set --config.momentum.final to 1.0 (cosine schedule to 1) or to momentum.base "
                          "(constant momentum).")


@dataclasses.dataclass(frozen=True)
class MomentumMethod(Method):
    """A method with an EMA target network in its state; see the module docstring.

    ``forward`` adds ``outputs['targets']`` [B, V, d]: the target network's
    projections of every view (stop-gradient). Subclasses set ``loss_fn``,
    ``loss_inputs`` and ``loss`` (and ``build_model`` when they need a
    predictor: :class:`PredictorMethod`).
    """

    def init_state(self, config, variables):
        target = jax.tree.map(jnp.copy, {"params": target_subtrees(variables.get("params", {})),
                                         "batch_stats": target_subtrees(variables.get("batch_stats", {}))})
        momentum = {"base": jnp.float32(config.momentum.base), "final": jnp.float32(config.momentum.final)}
        return {"target": target, "momentum": momentum}

    def target_forward(self, model, state, views, *, train: bool):
        """views [B, V, ...] -> the target's projections [B, V, d] (stop-gradient)."""
        b, v = views.shape[:2]
        flat = views.reshape((b * v,) + views.shape[2:])
        target = jax.lax.stop_gradient(state["target"])
        variables = {"params": target["params"], "batch_stats": target["batch_stats"]}
        if train:  # batch statistics, as the online network; the new running statistics are dropped
            z, _ = model.apply(variables, flat, True, method=_target_apply, mutable=["batch_stats"])
        else:
            z = model.apply(variables, flat, False, method=_target_apply)
        return jax.lax.stop_gradient(z).reshape((b, v) + z.shape[1:])

    def forward(self, model, variables, views, state, *, train: bool):
        outputs, batch_stats = super().forward(model, variables, views, state, train=train)
        # Multi-crop: the target sees only the global crops (the targets of every crop).
        outputs["targets"] = self.target_forward(model, state, multicrop.global_views(views), train=train)
        return outputs, batch_stats

    def after_update(self, state, *, params, batch_stats, step, total_steps):
        tau = momentum_at(step - 1, total_steps, state["momentum"]["base"], state["momentum"]["final"])
        online = {"params": target_subtrees(params), "batch_stats": target_subtrees(batch_stats)}
        return dict(state, target=ema(state["target"], online, tau))

    def validate(self, config) -> None:
        check_momentum_config(config)


@dataclasses.dataclass(frozen=True)
class PredictorMethod(MomentumMethod):
    """A momentum method whose online network has a predictor after the projector (BYOL, MoCo v3).

    The predictor is an MLP of ``config.predictor.hidden_dims`` hidden layers
    (Linear - BatchNorm (``use_bn``) - ReLU) and a linear output layer of
    ``config.projector.out_dim`` units; its output is ``outputs['predictions']``.
    Its loss is ``loss_fn(p_a, p_b, t_a, t_b, *, axis_name, **kw)``: the online
    predictions of both views against the target's projections of both views.
    With multi-crop outputs (predictions [B, 2 + V, d], targets of the global
    crops [B, 2, d]) it is ``multicrop_loss_fn(p, t, *, axis_name, **kw)``.
    """

    multicrop_loss_fn: Optional[Callable[..., Any]] = None

    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        del batch
        p, t = outputs["predictions"], outputs["targets"]
        if p.shape[1] > multicrop.NUM_GLOBAL:
            loss, metrics = self.multicrop_loss_fn(p, t, axis_name=axis_name, **loss_kwargs)
            return loss, state, metrics
        loss, metrics = self.loss_fn(p[:, 0], p[:, 1], t[:, 0], t[:, 1], axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics

    def build_model(self, config, num_classes: int):
        from clrjax import models
        predictor = dict(hidden_dims=tuple(config.predictor.hidden_dims), out_dim=int(config.projector.out_dim),
                         use_bn=bool(config.predictor.use_bn), last_bn=False)
        return models.build_ssl_model(config.model.to_dict(), config.projector.to_dict(), num_classes,
                                      predictor_cfg=predictor)
