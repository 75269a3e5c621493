"""Zero-shot accuracy, prompt ensembling and retrieval recall against float64 NumPy loops."""
import numpy as np
import pytest

from clrjax.data.tokenizers import ByteTokenizer
from clrjax.evaluation import zero_shot


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zero_shot_matches_a_loop_over_images():
    rng = np.random.default_rng(0)
    img, classes = rng.normal(size=(50, 6)), _unit(rng.normal(size=(7, 6)))
    labels = rng.integers(0, 7, size=50)
    got = zero_shot.zero_shot_accuracy(img, classes, labels, ks=(1, 5))
    for k in (1, 5):
        hits = [labels[i] in np.argsort(-(_unit(img[i]) @ classes.T))[:k] for i in range(50)]
        assert got[f"top{k}"] == pytest.approx(np.mean(hits), abs=1e-6)  # a float32 mean
    assert 0 < got["top1"] < got["top5"] < 1  # not vacuous


def test_class_vectors_are_the_renormalised_mean_of_normalised_prompts():
    rng = np.random.default_rng(1)
    proj = rng.normal(size=(256 + 3, 5))
    tokenizer = ByteTokenizer(16)

    def encode_text(tokens):  # a stand-in text tower: mean of per-token vectors
        return proj[np.asarray(tokens)].mean(axis=1)

    names, templates = ["cat", "dog"], ["a {}.", "the {} here."]
    got = np.asarray(zero_shot.class_embeddings(encode_text, tokenizer, names, templates, 16))
    for c, name in enumerate(names):
        prompts = _unit(encode_text(tokenizer.encode_batch([t.format(name) for t in templates], 16)))
        np.testing.assert_allclose(got[c], _unit(prompts.mean(axis=0)), rtol=1e-5, atol=1e-6)


def test_retrieval_recall_matches_ranks_and_counts_ties_against_the_pair():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(40, 8))
    txt = img + 1.5 * rng.normal(size=(40, 8))
    got = zero_shot.retrieval_recall(img, txt)
    s = _unit(img) @ _unit(txt).T
    for k in (1, 5, 10):
        i2t = np.mean([np.sum(s[i] > s[i, i]) < k for i in range(40)])
        t2i = np.mean([np.sum(s[:, j] > s[j, j]) < k for j in range(40)])
        assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
    assert 0 < got["i2t_r1"] < got["i2t_r10"] <= 1
    collapsed = zero_shot.retrieval_recall(np.ones((10, 3)), np.ones((10, 3)), ks=(1, 5))
    assert collapsed["i2t_r1"] == 0.0 and collapsed["i2t_r5"] == 0.0
