"""Independent float64 references of the image-text losses, from the papers.

Written from the definitions on the full N x N logit matrix, sharing no code
with ``clrjax.losses``. Each takes an array module ``xp`` (numpy by default,
or jax.numpy under ``jax.enable_x64`` for float64 reference gradients).
"""
from __future__ import annotations

import math

import numpy as np


def _normalize(z, xp):
    return z / xp.sqrt(xp.sum(z * z, axis=1, keepdims=True))


def _cross_entropy_of_diagonal(logits, xp):
    """mean_i [log sum_j exp(logits_ij) - logits_ii]."""
    m = xp.max(logits, axis=1, keepdims=True)
    lse = xp.log(xp.sum(xp.exp(logits - m), axis=1)) + m[:, 0]
    return xp.mean(lse - xp.diagonal(logits))


def clip(img, txt, logit_scale, xp=np):
    """Radford et al. 2021, Figure 3: (CE over rows + CE over columns) / 2, scale capped at 100."""
    scale = xp.exp(xp.minimum(logit_scale, math.log(100.0)))
    logits = scale * (_normalize(img, xp) @ _normalize(txt, xp).T)
    i2t = _cross_entropy_of_diagonal(logits, xp)
    t2i = _cross_entropy_of_diagonal(logits.T, xp)
    return (i2t + t2i) / 2


def clip_metrics(img, txt, logit_scale):
    logits = np.exp(min(logit_scale, math.log(100.0))) * (_normalize(img, np) @ _normalize(txt, np).T)
    idx = np.arange(len(img))
    return {"i2t_accuracy": np.mean(np.argmax(logits, axis=1) == idx),
            "t2i_accuracy": np.mean(np.argmax(logits, axis=0) == idx),
            "i2t_loss": _cross_entropy_of_diagonal(logits, np),
            "t2i_loss": _cross_entropy_of_diagonal(logits.T, np),
            "scale": min(math.exp(logit_scale), 100.0)}


def _log_sigmoid(x, xp):
    # log(1 / (1 + e^-x)), in the stable form -log(1 + e^-|x|) + min(x, 0).
    return xp.minimum(x, 0.0) - xp.log1p(xp.exp(-xp.abs(x)))


def siglip(img, txt, log_t, bias, xp=np):
    """Zhai et al. 2023, eq. 1: -(1/N) sum_ij log sigmoid(z_ij (t u_i . v_j + b))."""
    n = img.shape[0]
    logits = xp.exp(log_t) * (_normalize(img, xp) @ _normalize(txt, xp).T) + bias
    z = 2.0 * np.eye(n) - 1.0
    return -xp.sum(_log_sigmoid(z * logits, xp)) / n


def siglip_metrics(img, txt, log_t, bias):
    n = img.shape[0]
    logits = np.exp(log_t) * (_normalize(img, np) @ _normalize(txt, np).T) + bias
    idx = np.arange(n)
    off = ~np.eye(n, dtype=bool)
    return {"i2t_accuracy": np.mean(np.argmax(logits, axis=1) == idx),
            "t2i_accuracy": np.mean(np.argmax(logits, axis=0) == idx),
            "positive_logit": np.mean(np.diagonal(logits)),
            "negative_logit": np.mean(logits[off]),
            "t": np.exp(log_t), "bias": bias}


def image_text_pairs(n, d, seed=0, noise=0.8):
    """Random float64 tower outputs whose pairs are correlated (accuracies strictly inside (0, 1))."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    txt = img + noise * rng.normal(size=(n, d))
    return img, 2.0 * txt  # unequal norms: the normalisation matters
