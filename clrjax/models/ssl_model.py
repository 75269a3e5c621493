"""The pretraining model: encoder f, projector g, and an online linear probe.

    h = f(x)                       features     [B, F] float32
    z = g(h)                       embeddings   [B, D] float32 (fed to the SSL loss)
    logits = probe(stop_grad(h))   probe_logits [B, num_classes] float32

The probe sees ``stop_gradient(h)`` so its cross-entropy trains only the probe
and never shapes the representation (SimCLR's online evaluation, BYOL's
"online classifier"). The variable tree's top-level names are fixed:
'encoder', 'projector', 'probe' -- the trainer gives 'probe' its own
optimizer, and the export takes the 'encoder' subtree.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax

from clrjax.models.heads import LinearProbe


class SSLModel(nn.Module):
    """Encoder + projector [+ predictor] + online probe; see the module docstring.

    Attributes:
      encoder: any clrjax encoder (``__call__(x, train) -> [B, F]``).
      projector: a :class:`clrjax.models.heads.Projector`.
      num_classes: number of classes of the online linear probe.
      predictor: optional MLP after the projector (BYOL, MoCo v3): its output
        ``p = q(z)`` is ``'predictions'`` and its variables are 'predictor'.
        Without it the variable tree is exactly encoder/projector/probe.
    """

    encoder: nn.Module
    projector: nn.Module
    num_classes: int
    predictor: Optional[nn.Module] = None

    def setup(self):
        # The probe is built here (not passed in) so its name is always 'probe';
        # modules passed as attributes are named after the attribute.
        self.probe = LinearProbe(self.num_classes)

    def __call__(self, x, train: bool) -> Dict[str, jax.Array]:
        """x: float [B, H, W, C] -> dict(features, embeddings, [predictions,] probe_logits)."""
        out = self.project(x, train)
        if self.predictor is not None:
            out["predictions"] = self.predictor(out["embeddings"], train=train)
        out["probe_logits"] = self.probe(jax.lax.stop_gradient(out["features"]))
        return out

    def project(self, x, train: bool) -> Dict[str, jax.Array]:
        """x -> dict(features, embeddings): encoder and projector only. Applied to a momentum
        target's variables (those two subtrees) this is BYOL's target / MoCo's key encoder."""
        h = self.encoder(x, train=train)
        return {"features": h, "embeddings": self.projector(h, train=train)}

    def encode(self, x, train: bool = False) -> jax.Array:
        """x: float [B, H, W, C] -> features [B, F] float32 (encoder only)."""
        return self.encoder(x, train=train)


def encoder_variables(ssl_variables: Mapping[str, Any]) -> Dict[str, Any]:
    """The encoder's own variables, ``{'params': ..., 'batch_stats': ...}``, from the SSLModel's.

    Takes the 'encoder' subtree of every collection that has one (ViTs have
    no 'batch_stats'); this is what :func:`clrjax.export.export_encoder`
    expects and what ``build_encoder(cfg).apply`` accepts.
    """
    return {name: tree["encoder"] for name, tree in ssl_variables.items() if "encoder" in tree}
