"""Zero-shot classification and image-text retrieval from two towers' embeddings.

Zero-shot (Radford et al. 2021, sec. 3.1.2 and 3.1.4): every class name is
written into several prompt templates; each prompt's text embedding is
L2-normalised, the class vector is their mean, normalised again ("ensembling
over the embedding space"); an image is assigned the class whose vector has
the largest cosine with its normalised image embedding.

Retrieval: pair i is image i and text i. Image-to-text Recall@k is the
fraction of images whose own text is among the k texts of highest cosine;
text-to-image likewise. Ties count against the pair (its rank is 1 plus the
number of other candidates scoring at least as high), so an embedding that
maps everything to one point has recall 0 for every k < N, not 1.
Zero-shot ranks count only classes scoring strictly higher (a tie with the
true class is a hit).

Not yet wired into the trainer's periodic evaluation (plain functions of
host or device arrays; memory O(N_images x N_texts)).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import jax.numpy as jnp


def _normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def class_embeddings(encode_text: Callable, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                     context_length: int) -> jnp.ndarray:
    """[C, d] unit class vectors: the mean of each class's normalised prompt embeddings, renormalised.

    ``encode_text(tokens int32 [n, L]) -> [n, d]`` is the text tower with its projection.
    """
    prompts = [t.format(name) for name in class_names for t in templates]
    tokens = tokenizer.encode_batch(prompts, context_length)
    emb = _normalize(jnp.asarray(encode_text(tokens), jnp.float32))
    return _normalize(emb.reshape(len(class_names), len(templates), -1).mean(axis=1))


def zero_shot_accuracy(image_embeddings, class_vectors, labels, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracy of assigning each image its nearest class vector (cosine)."""
    scores = _normalize(jnp.asarray(image_embeddings, jnp.float32)) @ jnp.asarray(class_vectors).T
    labels = jnp.asarray(labels)
    own = jnp.take_along_axis(scores, labels[:, None], axis=1)
    rank = jnp.sum(scores > own, axis=1)  # classes strictly better than the true one
    return {f"top{k}": float(jnp.mean(rank < k)) for k in ks if k <= scores.shape[1]}


def _recall(scores, ks) -> Dict[int, float]:
    own = jnp.diagonal(scores)[:, None]
    # others scoring at least as high as the own pair (ties count against it)
    rank = jnp.sum(scores >= own, axis=1) - 1
    return {k: float(jnp.mean(rank < k)) for k in ks}


def retrieval_recall(image_embeddings, text_embeddings, ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """Image-to-text and text-to-image Recall@k of N pairs (row i of both is one pair)."""
    scores = _normalize(jnp.asarray(image_embeddings, jnp.float32)) @ _normalize(
        jnp.asarray(text_embeddings, jnp.float32)).T
    out = {f"i2t_r{k}": v for k, v in _recall(scores, ks).items()}
    out.update({f"t2i_r{k}": v for k, v in _recall(scores.T, ks).items()})
    return out


__all__ = ["class_embeddings", "zero_shot_accuracy", "retrieval_recall"]
