"""Projection head and online linear probe.

Projector (SimCLR, Chen et al. 2020, Sec. 2.1; SimCLR v2; Barlow Twins,
Zbontar et al. 2021, Sec. 2; VICReg): for each hidden width
``Linear (no bias) -> BatchNorm -> ReLU`` (the bias is dropped because the BN
that follows removes it), then a final ``Linear`` to ``out_dim``, optionally
followed by an affine-free BatchNorm (SimCLR v2's last projector layer,
Barlow Twins' normalisation of z before the cross-correlation). Without
``use_bn`` the hidden layers are ``Linear (with bias) -> ReLU``.

Parameter names: ``dense_{i}``, ``bn_{i}`` (hidden layers), ``dense_out``,
``bn_out`` (last BN, batch_stats only: it has no scale or bias).

Shapes: ``[B, F] -> [B, out_dim]`` float32 for the projector;
``[B, F] -> [B, num_classes]`` float32 logits for the probe.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp


class Projector(nn.Module):
    """MLP projection head g(h) -> z; see the module docstring."""

    hidden_dims: Sequence[int]
    out_dim: int
    use_bn: bool = True
    last_bn: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h, train: bool):
        """h: [B, F] -> z: float32 [B, out_dim]."""
        x = jnp.asarray(h, self.dtype)
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, use_bias=not self.use_bn, dtype=self.dtype,
                         param_dtype=jnp.float32, name=f"dense_{i}")(x)
            if self.use_bn:
                x = self._batch_norm(train, affine=True, name=f"bn_{i}")(x)
            x = nn.relu(x)
        x = nn.Dense(self.out_dim, use_bias=not self.last_bn, dtype=self.dtype,
                     param_dtype=jnp.float32, name="dense_out")(x)
        if self.last_bn:
            x = self._batch_norm(train, affine=False, name="bn_out")(x)
        return x.astype(jnp.float32)

    def _batch_norm(self, train: bool, affine: bool, name: str) -> nn.BatchNorm:
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            use_scale=affine, use_bias=affine, dtype=self.dtype,
                            param_dtype=jnp.float32, name=name)


class LinearProbe(nn.Module):
    """Linear classifier on (stop-gradient) features: [B, F] -> float32 logits [B, num_classes].

    Always float32: the probe is tiny and its logits feed a cross-entropy.
    """

    num_classes: int

    @nn.compact
    def __call__(self, h):
        return nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                        name="dense")(jnp.asarray(h, jnp.float32))
