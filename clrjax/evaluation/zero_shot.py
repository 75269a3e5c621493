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

What the evaluations read is a :class:`TowerSet` (the test split's image
embeddings, its labels, class names and captions, and a text encoder), and
:func:`zero_shot_metrics` / :func:`retrieval_metrics` compute every reported
number from one, under one set of names (``zero_shot_top1``,
``retrieval_i2t_r1``, ...). Three callers build it: the end-of-training
report of a model with a text tower (:func:`image_text_report`, from
``clrjax/evaluation/run_eval.py``), the periodic evaluators ``zero_shot`` and
``retrieval`` (``clrjax/evaluation/periodic.py``), and
``experiments/zero_shot_eval.py`` on a run's checkpoint
(``clrjax/evaluation/towers.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

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


# --------------------------------------------------------------------------- what the evaluations read

ZERO_SHOT_KS = (1, 5)
RETRIEVAL_KS = (1, 5, 10)
# CLIP sec. 3.1.4: "the prompt template 'A photo of a {label}.' [is] a good default"; used when
# neither the caller nor the test split (ClassCaptionSource.templates) gives templates.
DEFAULT_TEMPLATES = ("a photo of a {}.",)


def template_problem(template) -> Optional[str]:
    """Why ``template`` is not a prompt template (None if it is): one ``{}`` for the class name."""
    if not isinstance(template, str) or template.count("{}") != 1:
        return "must hold {} exactly once, where the class name goes"
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return "must hold no other braces than the {} for the class name"
    return None


def templates_of(source, templates: Sequence[str] = ()) -> Tuple[str, ...]:
    """``templates`` if given, else the source's own (the phrasings it trains on), else CLIP's default."""
    return tuple(templates) or tuple(getattr(source, "templates", None) or ()) or DEFAULT_TEMPLATES


def zero_shot_problem(source) -> Optional[str]:
    """Why zero-shot cannot score ``source`` (None if it can): its classes need names."""
    names = tuple(getattr(source, "class_names", None) or ())
    if not names:
        return "has no class names, which zero-shot classification writes into the prompts"
    if len(names) != int(source.num_classes):
        return f"has {len(names)} class names for {source.num_classes} classes"
    return None


def retrieval_problem(source) -> Optional[str]:
    """Why retrieval cannot score ``source`` (None if it can): every image needs a caption."""
    if not getattr(source, "has_captions", False):
        return "has no captions, which retrieval pairs with the images"
    return None


@dataclasses.dataclass
class TowerSet:
    """What the image-text evaluations read (the towers' counterpart of ``FeatureSet``).

    Attributes:
      image_embeddings: float32 [N, d], the test split's image embeddings in dataset order.
      labels: int32 [N].
      source: the test split (``class_names``, ``templates``, ``captions_of``).
      encode_text: int32 tokens [n, L] -> float32 [n, d] text embeddings.
      tokenizer, context_length: how strings become tokens (``config.text``).
      seed: the run's seed: which caption of each image retrieval uses (:func:`test_captions`).
    """
    image_embeddings: np.ndarray
    labels: np.ndarray
    source: Any
    encode_text: Callable[[np.ndarray], np.ndarray]
    tokenizer: Any
    context_length: int
    seed: int


def zero_shot_metrics(ts: TowerSet, templates: Sequence[str] = (),
                      ks: Sequence[int] = ZERO_SHOT_KS) -> Dict[str, float]:
    """``{'zero_shot_top1', 'zero_shot_top5'}`` of the test split's class names (:func:`templates_of`)."""
    problem = zero_shot_problem(ts.source)
    if problem:
        raise ValueError(f"the test split {problem}")
    vectors = class_embeddings(ts.encode_text, ts.tokenizer, ts.source.class_names,
                               templates_of(ts.source, templates), ts.context_length)
    return {f"zero_shot_{k}": v for k, v in zero_shot_accuracy(ts.image_embeddings, vectors, ts.labels, ks).items()}


def retrieval_metrics(ts: TowerSet, ks: Sequence[int] = RETRIEVAL_KS,
                      block_size: Optional[int] = None) -> Dict[str, float]:
    """``{'retrieval_i2t_r1', ..., 'retrieval_t2i_r10'}``: each test image with one of its captions."""
    problem = retrieval_problem(ts.source)
    if problem:
        raise ValueError(f"the test split {problem}")
    tokens = ts.tokenizer.encode_batch(test_captions(ts.source, ts.seed), ts.context_length)
    texts = ts.encode_text(tokens)
    return {f"retrieval_{k}": v for k, v in
            retrieval_recall(ts.image_embeddings, texts, ks, block_size=block_size).items()}


# --------------------------------------------------------------------------- the towers of a model


def tower_fns(model, aug_cfg: Mapping[str, Any]) -> Tuple[Callable, Callable]:
    """(embed_image(variables, uint8 images), encode_text(variables, int32 tokens)) of a two-tower
    model (``clrjax/methods/image_text.py`` TwoTower), in inference mode, images eval-preprocessed."""
    from clrjax.data import augment

    def embed_image(variables, images):
        return model.apply(variables, augment.preprocess_eval(images, aug_cfg), method=model.embed_image)

    def encode_text(variables, tokens):
        return model.apply(variables, tokens, method=model.encode_text)

    return embed_image, encode_text


def encode_tokens(encode_text: Callable, variables, tokens: np.ndarray, batch_size: int, mesh) -> np.ndarray:
    """float32 [n, d] ``encode_text(variables, tokens)`` of int32 ``tokens`` [n, L], jitted batches
    sharded over ``mesh`` (every process encodes every text: texts are cheap next to images)."""
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

    return extract_features(encode_text, batches(), mesh=mesh, progress=False, variables=variables)[0]


def test_captions(source, seed: int) -> list:
    """One caption per example of ``source``: the one the data pipeline would give it in epoch 0
    with ``seed`` (:func:`clrjax.data.captions.choose`)."""
    from clrjax.data import captions as captions_lib

    ids = np.arange(len(source))
    return captions_lib.choose(source.captions_of(ids), seed, 0, ids)


def tower_set(towers: Tuple[Callable, Callable], variables, source, config, mesh,
              progress: bool = False, tokenizer=None) -> TowerSet:
    """The :class:`TowerSet` of ``source`` (the test split): its image embeddings are extracted now,
    each process its share (:func:`clrjax.evaluation.protocols.source_features`); texts are encoded
    when an evaluation asks. ``towers`` as :func:`tower_fns` returns; ``variables`` replicated over
    ``mesh``; ``config`` gives ``eval.batch_size``, ``text`` (the tokenizer unless ``tokenizer``) and
    ``seed``."""
    from clrjax.data import tokenizers
    from clrjax.evaluation.protocols import source_features

    embed_image, encode_text = towers
    batch_size = int(config.eval.batch_size)
    image_emb, labels = source_features(embed_image, variables, source, batch_size, mesh, progress)
    return TowerSet(image_emb, labels, source,
                    lambda tokens: encode_tokens(encode_text, variables, np.asarray(tokens), batch_size, mesh),
                    tokenizer or tokenizers.get_tokenizer(config.text.to_dict()), int(config.text.context_length),
                    int(config.seed))


def image_text_report(model, variables, config, mesh, source=None) -> Dict[str, float]:
    """Zero-shot top-k and retrieval Recall@k of a two-tower ``model`` on ``config.dataset.test_split``.

    ``variables`` replicated over ``mesh``. Image embeddings: image tower + projection
    (``TwoTower.embed_image``) after eval preprocessing; text: text tower + projection. Zero-shot
    (for a source with ``class_names``) ensembles the source's own ``templates``
    (``clrjax/data/class_captions.py``: the phrasings it trains on); retrieval (for a source with
    captions) pairs every test image with one of its captions (:func:`test_captions`). Every
    process computes the same numbers.
    """
    from clrjax.data import sources

    if source is None:
        source = sources.load_source(config.dataset.to_dict(), config.dataset.test_split)
    ts = tower_set(tower_fns(model, config.augment.to_dict()), variables, source, config, mesh)
    report: Dict[str, float] = {}
    if zero_shot_problem(source) is None:
        report.update(zero_shot_metrics(ts))
    if retrieval_problem(source) is None:
        report.update(retrieval_metrics(ts))
    return report


__all__ = ["class_embeddings", "zero_shot_accuracy", "retrieval_recall", "TowerSet", "tower_fns", "tower_set",
           "zero_shot_metrics", "retrieval_metrics", "encode_tokens", "test_captions", "image_text_report",
           "template_problem", "templates_of", "zero_shot_problem", "retrieval_problem"]
