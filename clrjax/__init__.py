"""clrjax: large-batch self-supervised contrastive learning in JAX/Flax."""

__version__ = "0.1.0"
