"""Argument checks shared by the losses: fail early with one clear sentence.

Shapes are static under ``jit``, so these checks run at trace time and cost
nothing at run time.
"""
from __future__ import annotations

import jax.numpy as jnp

IMPLS = ("auto", "replicated", "column_split")


def check_embedding_pair(z_a, z_b) -> None:
    """Raises ValueError unless z_a and z_b are matching ``[n_local, d]`` arrays."""
    if z_a.ndim != 2 or z_b.ndim != 2:
        raise ValueError(
            f"z_a and z_b must be 2-D [n_local, d] embeddings, got shapes {z_a.shape} and "
            f"{z_b.shape}; flatten the projector output to [batch, dim] first."
        )
    if z_a.shape != z_b.shape:
        raise ValueError(
            f"z_a and z_b must have the same shape (row i of both is the same image), got "
            f"{z_a.shape} and {z_b.shape}; pass the two views of the same batch."
        )


def check_positive(name: str, value) -> None:
    """Raises ValueError unless the (static) hyperparameter ``value`` is > 0."""
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}; pass a positive {name}.")


def check_unit_interval(name: str, value) -> None:
    """Raises ValueError unless 0 <= value < 1 (an EMA decay)."""
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}; pass a decay such as 0.9.")


def check_global_batch(n_global: int, minimum: int, method: str) -> None:
    """Raises ValueError when the global batch is too small for the statistics."""
    if n_global < minimum:
        raise ValueError(
            f"{method} needs a global batch of at least {minimum} rows, got {n_global}; "
            "increase the batch size."
        )


def resolve_impl(impl: str, dim: int, n_shards: int, axis_name) -> str:
    """Chooses how the [d, d] second-moment work is spread over devices.

    'replicated': each shard forms its local [d, d] contribution and the whole
    matrix is all-reduced (cheap for small d). 'column_split': each shard
    forms d/K columns from the gathered batch and only scalars are summed.
    'auto' picks column_split when there is an axis, d >= 1024 and K divides d.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}; use 'auto' unless benchmarking.")
    if impl == "auto":
        use_split = axis_name is not None and dim >= 1024 and dim % n_shards == 0
        return "column_split" if use_split else "replicated"
    if impl == "column_split" and dim % n_shards != 0:
        raise ValueError(
            f"impl='column_split' needs the embedding dim ({dim}) divisible by the number of "
            f"devices ({n_shards}); use impl='replicated' or a divisible projector width."
        )
    return impl


def check_labels(labels, n_local: int) -> None:
    """Raises ValueError unless ``labels`` is an integer ``[n_local]`` array (one per image)."""
    shape = getattr(labels, "shape", None)
    if shape != (n_local,):
        raise ValueError(f"labels must have shape ({n_local},), one class per image of this shard, "
                         f"got {shape}; pass batch['label'].")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}; pass integer class ids.")


def check_image_text_pair(img, txt) -> None:
    """Raises ValueError unless img and txt are matching ``[n_local, d]`` tower outputs."""
    if getattr(img, "ndim", None) != 2 or getattr(txt, "ndim", None) != 2:
        raise ValueError(
            f"img and txt must be 2-D [n_local, d] tower outputs, got shapes "
            f"{getattr(img, 'shape', None)} and {getattr(txt, 'shape', None)}; project both towers "
            "to [batch, joint_dim] first."
        )
    if img.shape != txt.shape:
        raise ValueError(
            f"img and txt must have the same shape (row i of both is one image-caption pair), got "
            f"{img.shape} and {txt.shape}; give both towers the same joint dimension and batch."
        )


def check_scalar(name: str, value) -> None:
    """Raises ValueError unless ``value`` (a learnable scale or bias) is a 0-d scalar."""
    shape = getattr(value, "shape", ())
    if tuple(shape) != ():
        raise ValueError(f"{name} must be a scalar (shape ()), got shape {tuple(shape)}; "
                         f"pass the parameter itself, e.g. params['{name}'].")
