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

Retrieval scores the texts in blocks of ``block_size`` columns, so memory is
O(N_images x block_size); every score is computed by the same compiled block
product, so the tie rule does not depend on the block size.

:func:`image_text_report` is the end-of-training evaluation of a model with a
text tower (``clrjax/evaluation/run_eval.py``): zero-shot top-1/top-5 on the
test split's class names and image<->text Recall@1/5/10 on its captions.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


RETRIEVAL_BLOCK = 4096  # texts per scoring block: 25k images x 4096 float32 scores = 410 MB


@jax.jit
def _block_scores(images, texts):
    # Kept a program of its own: every score, own pair or not, comes from this one product, so
    # ties are decided the same way whatever the block size (fused into a gather, the diagonal
    # could be computed by a different reduction).
    return images @ texts.T


@jax.jit
def _own_of_block(scores, start):
    """s_jj of the block's texts j = start + c (columns past N are clipped: dropped by the caller)."""
    cols = jnp.arange(scores.shape[1])
    return scores[jnp.minimum(start + cols, scores.shape[0] - 1), cols]


@jax.jit
def _counts_of_block(scores, own, start):
    """(per image, per text of the block): other candidates scoring >= the own pair, self included."""
    n, block = scores.shape
    cols = start + jnp.arange(block)
    valid = cols < n  # zero-padded texts of the last block
    i2t = jnp.sum((scores >= own[:, None]) & valid[None, :], axis=1)
    t2i = jnp.sum(scores >= own[jnp.minimum(cols, n - 1)][None, :], axis=0)
    return i2t, t2i


def _padded_blocks(texts, block: int):
    """(start, [block, d] texts zero-padded to one shape: one compiled product for every block)."""
    for start in range(0, texts.shape[0], block):
        chunk = texts[start:start + block]
        yield start, jnp.pad(chunk, ((0, block - chunk.shape[0]), (0, 0)))


def _ranks(images, texts, block: int):
    """(i2t, t2i) int32 [N]: how many other candidates score at least as high as the own pair."""
    n = images.shape[0]
    # pass 1: the own-pair scores s_ii; pass 2: the counts (the product is recomputed: O(N x block) memory)
    own = jnp.concatenate([_own_of_block(_block_scores(images, chunk), start)
                           for start, chunk in _padded_blocks(texts, block)])[:n]
    i2t, t2i = jnp.zeros((n,), jnp.int32), []
    for start, chunk in _padded_blocks(texts, block):
        rows, cols = _counts_of_block(_block_scores(images, chunk), own, start)
        i2t = i2t + rows
        t2i.append(cols)
    return i2t - 1, jnp.concatenate(t2i)[:n] - 1


def retrieval_recall(image_embeddings, text_embeddings, ks: Sequence[int] = (1, 5, 10),
                     block_size: Optional[int] = None) -> Dict[str, float]:
    """Image-to-text and text-to-image Recall@k of N pairs (row i of both is one pair).

    ``block_size`` texts are scored at a time (default :data:`RETRIEVAL_BLOCK`).
    """
    images = _normalize(jnp.asarray(image_embeddings, jnp.float32))
    texts = _normalize(jnp.asarray(text_embeddings, jnp.float32))
    block = int(min(block_size or RETRIEVAL_BLOCK, texts.shape[0]))
    i2t, t2i = _ranks(images, texts, block)
    out = {f"i2t_r{k}": float(jnp.mean(i2t < k)) for k in ks}
    out.update({f"t2i_r{k}": float(jnp.mean(t2i < k)) for k in ks})
    return out


# --------------------------------------------------------------------------- a run's report

ZERO_SHOT_KS = (1, 5)
RETRIEVAL_KS = (1, 5, 10)


def encode_tokens(model, variables, tokens: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """float32 [n, d] text embeddings of int32 ``tokens`` [n, L], jitted batches sharded over ``mesh``."""
    from clrjax.evaluation.features import extract_features
    from clrjax.evaluation.protocols import eval_batch_size

    batch = eval_batch_size(batch_size, mesh.size)
    n = len(tokens)

    def batches():
        for start in range(0, n, batch):
            chunk = tokens[start:start + batch]
            mask = np.arange(batch) < len(chunk)
            # padding rows repeat a real caption: the text tower is row-independent, they are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
            yield {"image": chunk, "label": np.zeros(batch, np.int32), "mask": mask}

    def encode(v, t):
        return model.apply(v, t, method=model.encode_text)

    return extract_features(encode, batches(), mesh=mesh, progress=False, variables=variables)[0]


def test_captions(source, seed: int) -> list:
    """One caption per example of ``source``: the one the data pipeline would give it in epoch 0
    with ``seed`` (:func:`clrjax.data.captions.choose`)."""
    from clrjax.data import captions as captions_lib

    ids = np.arange(len(source))
    return captions_lib.choose(source.captions_of(ids), seed, 0, ids)


def image_text_report(model, variables, config, mesh, source=None) -> Dict[str, float]:
    """Zero-shot top-k and retrieval Recall@k of a two-tower ``model`` on ``config.dataset.test_split``.

    ``variables`` replicated over ``mesh``. Image embeddings: image tower + projection
    (``TwoTower.embed_image``) after eval preprocessing; text: text tower + projection. Zero-shot
    (only for a source with ``class_names``) ensembles the source's own ``templates``
    (``clrjax/data/class_captions.py``: the phrasings it trains on); retrieval pairs every test
    image with one of its captions (:func:`test_captions`). Every process computes the same numbers.
    """
    from clrjax.data import augment, sources, tokenizers
    from clrjax.evaluation.protocols import source_features

    if source is None:
        source = sources.load_source(config.dataset.to_dict(), config.dataset.test_split)
    aug_cfg = config.augment.to_dict()

    def embed(v, images):
        return model.apply(v, augment.preprocess_eval(images, aug_cfg), method=model.embed_image)

    image_emb, labels = source_features(embed, variables, source, config.eval.batch_size, mesh)
    tokenizer = tokenizers.get_tokenizer(config.text.to_dict())
    length = int(config.text.context_length)
    report: Dict[str, float] = {}
    class_names = getattr(source, "class_names", None)
    if class_names:
        vectors = class_embeddings(
            lambda t: encode_tokens(model, variables, np.asarray(t), config.eval.batch_size, mesh),
            tokenizer, class_names, getattr(source, "templates", None) or ("a photo of a {}.",), length)
        report.update({f"zero_shot_{k}": v for k, v in
                       zero_shot_accuracy(image_emb, vectors, labels, ZERO_SHOT_KS).items()})
    tokens = tokenizer.encode_batch(test_captions(source, int(config.seed)), length)
    text_emb = encode_tokens(model, variables, tokens, config.eval.batch_size, mesh)
    report.update({f"retrieval_{k}": v for k, v in retrieval_recall(image_emb, text_emb, RETRIEVAL_KS).items()})
    return report


__all__ = ["class_embeddings", "zero_shot_accuracy", "retrieval_recall", "encode_tokens", "test_captions",
           "image_text_report"]
