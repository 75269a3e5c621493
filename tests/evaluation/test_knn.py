"""Blockwise weighted kNN against a brute-force NumPy reference (Wu et al. 2018, sec. 3.4)."""
import numpy as np
import pytest

from clrjax.evaluation.knn import knn_accuracy, knn_neighbors, knn_predict

T = 0.07
NUM_CLASSES = 6


def reference_knn(train, train_labels, test, k, temperature=T, num_classes=NUM_CLASSES):
    """Brute force in float64: full similarity matrix, stable sort, exp(s/T) votes."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    sims = test.astype(np.float64) @ train.astype(np.float64).T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, idx, axis=1)
    scores = np.zeros((len(test), num_classes))
    for row in range(len(test)):
        for s, j in zip(top[row], idx[row]):
            scores[row, train_labels[j]] += np.exp(s / temperature)
    return top, idx, scores


@pytest.fixture(scope="module")
def data():
    # Continuous random features: no exact ties in similarity.
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(NUM_CLASSES, 16))
    train_labels = rng.integers(0, NUM_CLASSES, 203)
    test_labels = rng.integers(0, NUM_CLASSES, 57)
    train = (centers[train_labels] + 1.5 * rng.normal(size=(203, 16))).astype(np.float32)
    test = (centers[test_labels] + 1.5 * rng.normal(size=(57, 16))).astype(np.float32)
    return train, train_labels, test, test_labels


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("test_block,train_block", [(10, 37), (57, 7), (4, 203)])
def test_neighbors_and_predictions_match_bruteforce(data, k, test_block, train_block):
    train, train_labels, test, _ = data
    ref_sims, ref_idx, ref_scores = reference_knn(train, train_labels, test, k)
    sims, idx = knn_neighbors(train, test, k=k, test_block=test_block, train_block=train_block)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    pred = knn_predict(train, train_labels, test, num_classes=NUM_CLASSES, k=k,
                       test_block=test_block, train_block=train_block)
    np.testing.assert_array_equal(pred, ref_scores.argmax(axis=1))


def test_accuracy_matches_reference_and_clips_large_k(data):
    train, train_labels, test, test_labels = data
    with pytest.warns(UserWarning, match="k=500 exceeds the train bank size 203"):
        result = knn_accuracy(train, train_labels, test, test_labels, num_classes=NUM_CLASSES,
                              ks=(1, 20, 500), test_block=16, train_block=50)
    for k, k_eff in [(1, 1), (20, 20), (500, 203)]:
        _, _, scores = reference_knn(train, train_labels, test, k_eff)
        top1 = np.mean(scores.argmax(axis=1) == test_labels)
        ranked = np.argsort(-scores, axis=1, kind="stable")[:, :5]
        label_score = scores[np.arange(len(test)), test_labels]
        top5 = np.mean((ranked == test_labels[:, None]).any(axis=1) & (label_score > 0))
        assert result[k]["top1"] == pytest.approx(top1, abs=1e-12)
        assert result[k]["top5"] == pytest.approx(top5, abs=1e-12)
    # The toy classes are learnable: the test is not comparing two chance numbers.
    assert result[20]["top1"] > 0.6
    # With k=1 only one class has a positive score: top-5 must equal top-1, not 5/6.
    assert result[1]["top5"] == result[1]["top1"]


def test_temperature_changes_the_vote():
    """A large T approaches a majority vote; a small T the nearest neighbour (Wu et al.'s weights matter)."""
    train = np.array([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]], np.float32)  # label 0 nearest, two label-1 further
    labels = np.array([0, 1, 1])
    query = np.array([[1.0, 0.01]], np.float32)
    assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.07)[0] == 0
    assert knn_predict(train, labels, query, num_classes=2, k=3, temperature=10.0)[0] == 1
    with pytest.raises(ValueError, match="temperature must be positive"):
        knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.0)
