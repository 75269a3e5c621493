"""Self-supervised losses, each exact on any number of devices, and their registry.

Every loss takes this shard's ``[n_local, d]`` embeddings of the two views and
an ``axis_name`` (None on one device) and returns the loss of the global batch
(see DESIGN.md, "One idea"). The trainer uses the registry only:

    method = get_method(config.loss.name)
    state = method.init_state(dim)                    # {} or {'cov': [d, d]}
    loss, state, metrics = method.apply(z_a, z_b, state, axis_name='data', **kw)
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable

import jax.numpy as jnp

from clrjax.losses.barlow_twins import barlow_twins_loss
from clrjax.losses.simclr import simclr_loss
from clrjax.losses.tico import tico_loss
from clrjax.losses.vicreg import vicreg_loss

__all__ = [
    "METHOD_NAMES",
    "Method",
    "barlow_twins_loss",
    "get_method",
    "loss_kwarg_names",
    "simclr_loss",
    "tico_loss",
    "vicreg_loss",
]


@dataclasses.dataclass(frozen=True)
class Method:
    """A self-supervised objective as the trainer sees it.

    Attributes:
      name: registry name.
      loss_fn: ``loss_fn(z_a, z_b, [cov,] *, axis_name, **kw)``.
      has_state: True when the loss carries state across steps (TiCo's cov).
    """

    name: str
    loss_fn: Callable[..., Any]
    has_state: bool

    def init_state(self, dim: int) -> dict:
        """Step-0 method state: {} if stateless, {'cov': zeros [dim, dim] f32} for TiCo."""
        if not self.has_state:
            return {}
        return {"cov": jnp.zeros((dim, dim), jnp.float32)}

    def apply(self, z_a, z_b, state, *, axis_name=None, **loss_kwargs):
        """Returns (loss, new_state, metrics); state passes through if stateless."""
        if not self.has_state:
            loss, metrics = self.loss_fn(z_a, z_b, axis_name=axis_name, **loss_kwargs)
            return loss, state, metrics
        loss, new_cov, metrics = self.loss_fn(z_a, z_b, state["cov"], axis_name=axis_name,
                                              **loss_kwargs)
        return loss, {"cov": new_cov}, metrics


_METHODS = {
    "simclr": Method("simclr", simclr_loss, has_state=False),
    "barlow_twins": Method("barlow_twins", barlow_twins_loss, has_state=False),
    "vicreg": Method("vicreg", vicreg_loss, has_state=False),
    "tico": Method("tico", tico_loss, has_state=True),
}
METHOD_NAMES = tuple(_METHODS)


def get_method(name: str) -> Method:
    """The registered Method called ``name``; ValueError naming the valid names."""
    if name not in _METHODS:
        raise ValueError(f"Unknown method {name!r}; valid names are {', '.join(METHOD_NAMES)}.")
    return _METHODS[name]


def loss_kwarg_names(name: str) -> tuple:
    """Keyword hyperparameters the method's loss accepts (excludes axis_name)."""
    params = inspect.signature(get_method(name).loss_fn).parameters.values()
    return tuple(p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "axis_name")
