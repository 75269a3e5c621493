"""Few-shot probes: per-seed stratified draws with the right counts, mean/std over seeds."""
import numpy as np
import pytest

from clrjax.evaluation import fewshot
from clrjax.evaluation.fewshot import few_shot, sample_per_class

C, D = 4, 8


@pytest.fixture(scope="module")
def blobs():
    rng = np.random.default_rng(0)
    means = 5.0 * np.eye(C, D)
    y = rng.integers(0, C, 600).astype(np.int32)
    x = (means[y] + rng.normal(size=(600, D))).astype(np.float32)
    return x[:400], y[:400], x[400:], y[400:]


def test_sample_per_class_is_stratified_without_replacement():
    labels = np.repeat(np.arange(3), 7)
    idx = sample_per_class(labels, 5, 3, seed=0)
    assert len(np.unique(idx)) == 15
    np.testing.assert_array_equal(np.bincount(labels[idx]), [5, 5, 5])
    assert not np.array_equal(idx, sample_per_class(labels, 5, 3, seed=1))
    with pytest.raises(ValueError, match="8-shot needs 8"):
        sample_per_class(labels, 8, 3, seed=0)


def test_few_shot_counts_and_statistics(blobs, monkeypatch):
    calls = []
    real_probe = fewshot.linear_probe_features

    def recording_probe(train_x, train_y, *args, **kwargs):
        calls.append((train_x.copy(), np.bincount(train_y, minlength=C), kwargs["l2"]))
        return real_probe(train_x, train_y, *args, **kwargs)

    monkeypatch.setattr(fewshot, "linear_probe_features", recording_probe)
    result = few_shot(*blobs, num_classes=C, shots=(1, 3), seeds=3)

    assert sorted(result) == [1, 3] and len(calls) == 6
    for i, shot in enumerate([1, 1, 1, 3, 3, 3]):
        np.testing.assert_array_equal(calls[i][1], [shot] * C)
        assert calls[i][2] == (0.1 if shot == 1 else None)  # fixed l2 only at 1-shot
    # Each seed draws a different sample.
    assert not np.array_equal(calls[3][0], calls[4][0])
    for shot in (1, 3):
        per_seed = result[shot]["per_seed"]
        assert len(per_seed) == 3
        assert result[shot]["mean"] == pytest.approx(np.mean(per_seed))
        assert result[shot]["std"] == pytest.approx(np.std(per_seed))
    assert result[1]["l2"] == [0.1] * 3
    # Well separated blobs: a few examples per class suffice.
    assert result[3]["mean"] >= 0.9
