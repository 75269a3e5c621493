"""SimCLR (Chen et al. 2020) and DCL (Yeh et al. 2022, ``decoupled=True``): NT-Xent on two views.

The loss is :func:`clrjax.losses.simclr_loss`; everything else is the interface's default.
Multi-crop (``config.augment.multicrop``): the multi-positive loss
:func:`clrjax.losses.multicrop.multicrop_contrastive_loss` (every crop an
anchor, the global crops the columns, the other global crops of the same
image the positives).
"""
import dataclasses

from clrjax.losses.multicrop import NUM_GLOBAL, multicrop_contrastive_loss
from clrjax.losses.simclr import simclr_loss
from clrjax.methods.base import Method


def check_dense_multicrop(config) -> None:
    """The multi-crop contrastive loss has no column streaming: ``loss.chunk_size`` must be unset."""
    from clrjax.config import ConfigError

    if config.augment.multicrop.num_local > 0 and config.loss.get("chunk_size", None) is not None:
        raise ConfigError(f"config.loss.chunk_size is {config.loss.chunk_size} but the multi-crop {config.method} "
                          "loss forms one dense block; unset --config.loss.chunk_size or set "
                          "--config.augment.multicrop.num_local=0.")


@dataclasses.dataclass(frozen=True)
class SimCLR(Method):
    def loss(self, outputs, batch, state, *, axis_name=None, **loss_kwargs):
        z = outputs["embeddings"]
        if z.shape[1] > NUM_GLOBAL:
            loss, metrics = multicrop_contrastive_loss(z, None, axis_name=axis_name, **loss_kwargs)
            return loss, state, metrics
        return super().loss(outputs, batch, state, axis_name=axis_name, **loss_kwargs)

    def validate(self, config) -> None:
        check_dense_multicrop(config)


METHOD = SimCLR(name="simclr", loss_fn=simclr_loss, supports_multicrop=True,
                source="Chen et al. 2020, eq. 1; DCL: Yeh et al. 2022, eq. 6")
