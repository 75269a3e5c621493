"""The method interface: what a method declares, and what the trainer does with it.

A method owns its step's science; the trainer (``clrjax.train``) owns the
loop, the mesh, checkpointing, the online probe, evaluation and logging, and
knows no method. One step of the trainer, in terms of this interface::

    views   = method.make_views(examples, key, config.augment)   # default: [B, V, H, W, C],
    #         V = num_views augmented views of batch['image']; any pytree with leading axis B
    outputs, batch_stats = method.forward(model, variables, views, method_state, train=True)
    #         'features' and 'probe_logits' (leading axes [B, ...]) feed the trainer's
    #         online probe, the rest is the method's business
    loss, method_state, metrics = shard_map(method.loss)(
        {k: outputs[k] for k in method.loss_inputs}, batch, method_state,
        axis_name='data', **config.loss)                # per shard, named-axis collectives
    ... gradients, optimizer (param groups from method.param_labels) ...
    method_state = method.after_update(method_state, params=new_params, batch_stats=new_batch_stats,
                                       step=step + 1, total_steps=total_steps)   # e.g. an EMA target

What a method declares (override what differs from the defaults):

==================  ==========================================================
``name``            registry name (``config.method``)
``loss_fn``         the plain per-shard loss function; its keyword-only
                    arguments (except ``axis_name``) are ``config.loss``,
                    with their defaults
``num_views``       augmented views per image (each its own augmentation
                    key; per-view blur/solarisation from ``config.augment``)
``uses_labels``     the loss reads ``batch['label']`` (SupCon, supervised)
``loss_inputs``     which model outputs the loss receives (default
                    ``('embeddings',)``)
``make_views``      ``(examples, key, augment_config) -> views``: the networks'
                    inputs from this batch's per-example fields ('image'
                    uint8, 'index', 'label', 'text' tokens of image-text
                    data); any pytree whose leaves have leading axis B
                    (default: ``num_views`` augmented views [B, V, S, S, C];
                    multi-crop: one array per resolution; image-text: the
                    image views and the tokens)
``build_model``     the networks: ``(config, num_classes) -> flax Module``
                    whose ``__call__(x, train)`` returns a dict with at
                    least 'features' [n, F] and 'probe_logits' (default:
                    encoder + projector + online probe, ``SSLModel``)
``forward``         ``(model, variables, views, state, *, train) ->
                    (outputs, batch_stats)``: the networks on the views
                    (default: every view through the model as one batch);
                    a momentum method runs its target network here
``init_state``      ``(config, variables)``: step-0 method state, a pytree (TiCo's covariance, a
                    queue, EMA parameters); ``{}`` when stateless. It is
                    replicated, carried in the train state, checkpointed
``loss``            ``(outputs, batch, state, *, axis_name, **kw) ->
                    (loss, new_state, metrics)`` on this shard's rows; loss,
                    state and metrics must be global (identical on every
                    shard)
``after_update``    ``(state, *, params, batch_stats, step, total_steps) ->
                    state`` after the optimizer update (an EMA of the online
                    network; ``step`` counts completed steps, for schedules)
``param_labels``    optimizer group of every parameter: 'ssl' (the
                    method's optimizer), 'probe' (the probe's Adam) or
                    'frozen' (no update, no optimizer state)
``supports_multicrop``  whether the loss takes multi-crop outputs [B, 2 + V, ...]
                    (``config.augment.multicrop.num_local`` > 0; default False;
                    see :mod:`clrjax.methods.multicrop`)
``supports_gradient_cache``  whether ``forward`` treats examples
                    independently (BatchNorm aside), so that gradient
                    caching (``config.micro_batch_size``) may run it on
                    micro-batches; default True
==================  ==========================================================

The default ``loss`` calls ``loss_fn(z[:, 0], z[:, 1], axis_name=..., **kw)``
on the two views' embeddings, which is all a two-view method with a
stateless loss needs.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Mapping, Tuple

import jax

PROBE_COLLECTION = "probe"
PARAM_GROUPS = ("ssl", "probe", "frozen")


@dataclasses.dataclass(frozen=True)
class Method:
    """A method as the trainer sees it; see the module docstring.

    Subclass and override to change what runs; plain instances suit
    two-view methods whose loss is ``loss_fn(z_a, z_b, *, axis_name, **kw)``.
    """

    name: str
    loss_fn: Callable[..., Any]
    source: str = ""
    num_views: int = 2
    uses_labels: bool = False
    loss_inputs: Tuple[str, ...] = ("embeddings",)
    supports_gradient_cache: bool = True
    supports_multicrop: bool = False

    # ------------------------------------------------------------ networks and state

    def build_model(self, config, num_classes: int):
        """Encoder + projector + online probe from ``config.model`` and ``config.projector``."""
        from clrjax import models  # local: methods are importable without flax models built
        return models.build_ssl_model(config.model.to_dict(), config.projector.to_dict(), num_classes)

    def init_state(self, config, variables) -> Any:
        """Step-0 method state (replicated pytree) from the config and the initial model
        variables ``{'params', 'batch_stats'}`` (a momentum target starts as a copy of them);
        ``{}`` for a stateless method."""
        del config, variables
        return {}

    def param_labels(self, params: Mapping[str, Any]) -> Dict[str, Any]:
        """'probe' for the online probe's parameters, 'ssl' for everything else."""
        return {name: jax.tree.map(lambda _, n=name: "probe" if n == PROBE_COLLECTION else "ssl", sub)
                for name, sub in params.items()}

    # ------------------------------------------------------------ the step

    def make_views(self, examples, key, augment_config):
        """The networks' inputs for these examples: ``num_views`` augmented views [B, V, S, S, C].

        ``examples`` holds the per-example fields of (a micro-batch of) the global
        batch, each with leading axis B; ``key`` is the step's key. Augmentation
        randomness must come from ``fold_in(key, examples['index'])`` (as
        :func:`clrjax.data.augment.views` does) so that the views do not depend on
        how the batch is split over devices or micro-batches. Override for views of
        several resolutions or for inputs besides images; the result may be any
        pytree whose leaves have leading axis B, and is what ``forward`` receives.
        With ``augment.multicrop.num_local`` > 0: the global and local crops of
        :func:`clrjax.methods.multicrop.make_views`.
        """
        from clrjax.data import augment  # local: keeps the interface module light
        from clrjax.methods import multicrop

        crops = multicrop.settings(augment_config)
        if crops is not None:
            return multicrop.make_views(examples, key, augment_config, crops)
        return augment.views(examples["image"], examples["index"], key, augment_config, self.num_views)

    def forward(self, model, variables, views, state, *, train: bool):
        """views [B, V, H, W, C] -> (outputs with leading [B, V], new batch_stats).

        ``state`` is the method state (e.g. a momentum target's parameters, for
        methods that run a second network here); the default ignores it.

        All views go through the networks as one batch (rows of example b are
        adjacent, so each device keeps its own rows and BatchNorm statistics
        are those of every view of the global batch). Multi-crop views go
        through :func:`clrjax.methods.multicrop.forward` (the encoder once per
        resolution), giving outputs [B, 2 + V, ...].
        """
        del state
        from clrjax.methods import multicrop

        if multicrop.is_multicrop(views):
            return multicrop.forward(model, variables, views, train=train)
        b, v = views.shape[:2]
        flat = views.reshape((b * v,) + views.shape[2:])
        if train:
            out, mutated = model.apply(variables, flat, train=True, mutable=["batch_stats"])
            batch_stats = mutated.get("batch_stats", {})
        else:
            out, batch_stats = model.apply(variables, flat, train=False), variables.get("batch_stats", {})
        return jax.tree.map(lambda x: x.reshape((b, v) + x.shape[1:]), out), batch_stats

    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        """(loss, new_state, metrics) of the global batch from this shard's rows."""
        del batch
        z = outputs["embeddings"]
        loss, metrics = self.loss_fn(z[:, 0], z[:, 1], axis_name=axis_name, **loss_kwargs)
        return loss, state, metrics

    def after_update(self, state, *, params, batch_stats, step, total_steps):
        """Method state after the optimizer step (identity unless the method keeps e.g. an EMA).

        ``params``/``batch_stats`` are the new online variables, ``step`` the
        number of completed steps (traced), ``total_steps`` the run's length
        (a Python int, for schedules such as BYOL's momentum).
        """
        del params, batch_stats, step, total_steps
        return state

    # ------------------------------------------------------------ config

    def loss_kwarg_defaults(self) -> Dict[str, Any]:
        """Keyword hyperparameters of ``loss_fn`` (excluding axis_name) with their defaults."""
        params = inspect.signature(self.loss_fn).parameters.values()
        return {p.name: p.default for p in params
                if p.kind is p.KEYWORD_ONLY and p.name != "axis_name"}

    def validate(self, config) -> None:
        """Method-specific config checks; raise ``clrjax.config.ConfigError``. Default: none."""
        del config
