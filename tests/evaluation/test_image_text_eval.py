"""The end-of-training image-text evaluation (zero-shot + retrieval) and blockwise retrieval.

References are float64 NumPy loops written from the definitions in
clrjax/evaluation/zero_shot.py's docstring (CLIP, Radford et al. 2021, sec. 3.1.4
for the prompt ensemble), on the model's own tower outputs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import methods, parallel
from clrjax.data import augment, captions, class_captions, sources, tokenizers
from clrjax.evaluation import protocols, run_eval, zero_shot


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _rank_recall(s, ks):
    """Recall@k from a float64 score matrix: others scoring >= the own pair count against it."""
    n = len(s)
    i2t = [np.sum(s[i] >= s[i, i]) - 1 for i in range(n)]
    t2i = [np.sum(s[:, j] >= s[j, j]) - 1 for j in range(n)]
    out = {f"i2t_r{k}": np.mean(np.asarray(i2t) < k) for k in ks}
    out.update({f"t2i_r{k}": np.mean(np.asarray(t2i) < k) for k in ks})
    return out


@pytest.mark.parametrize("block", [1, 3, 8, 29])
def test_blockwise_retrieval_equals_dense_and_counts_ties_against_the_pair(block):
    rng = np.random.default_rng(0)
    img = rng.normal(size=(29, 6))
    txt = img + 1.2 * rng.normal(size=(29, 6))
    # exact ties: pairs 10-14 are copies of pair 3 (image and text), text 20 copies text 21
    img[10:15], txt[10:15] = img[3], txt[3]
    txt[20] = txt[21]
    ks = (1, 5, 10)
    got = zero_shot.retrieval_recall(img, txt, ks, block_size=block)
    dense = zero_shot.retrieval_recall(img, txt, ks, block_size=29)
    assert got == dense  # the same compiled product scores every block: identical counts
    want = _rank_recall(_unit(img) @ _unit(txt).T, ks)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key
    assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1  # not vacuous
    collapsed = zero_shot.retrieval_recall(np.ones((9, 3)), np.ones((9, 3)), (1, 5), block_size=2)
    assert collapsed == {"i2t_r1": 0.0, "i2t_r5": 0.0, "t2i_r1": 0.0, "t2i_r5": 0.0}


def _digits_model():
    from configs import clip as clip_config

    config = clip_config.get_config("digits")
    config.eval.batch_size = 16
    config.model.widths = (8, 8, 16, 16)  # a smaller image tower: the wiring, not the model, is tested
    base = sources.load_source(config.dataset.to_dict(), config.dataset.test_split).base
    n = 37  # not a multiple of the 8 devices or of the batch: the padding is exercised
    rows = base[np.arange(n)]
    source = class_captions.ClassCaptionSource(sources.ArraySource(rows["image"], rows["label"], 10),
                                               class_captions.DIGIT_NAMES)
    model = methods.get("clip").build_model(config, 10)
    crop = config.augment.crop_size
    variables = model.init(jax.random.PRNGKey(1), jnp.zeros((2, crop, crop, rows["image"].shape[-1])),
                           train=False)
    return config, source, model, dict(variables), rows


def _reference(config, source, model, variables, rows):
    """Zero-shot and retrieval from one-device tower outputs, projections and scoring in float64."""
    x = augment.preprocess_eval(jnp.asarray(rows["image"]), config.augment.to_dict())
    # jitted (an eager ResNet is slow), on one device, all rows in one call
    h = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, x), np.float64)
    img = h @ np.asarray(variables["params"]["image_projection"]["kernel"], np.float64)
    tok = tokenizers.get_tokenizer(config.text.to_dict())
    length = config.text.context_length

    def text(strings):
        tokens = jnp.asarray(tok.encode_batch(strings, length))
        return np.asarray(jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, tokens),
                          np.float64)

    names, templates = class_captions.DIGIT_NAMES, class_captions.TEMPLATES
    classes = _unit(np.stack([_unit(text([t.format(c) for t in templates])).mean(0) for c in names]))
    s = _unit(img) @ classes.T
    labels = rows["label"]
    better = np.array([np.sum(s[i] > s[i, labels[i]]) for i in range(len(labels))])
    ref = {"zero_shot_top1": np.mean(better < 1), "zero_shot_top5": np.mean(better < 5)}
    ids = np.arange(len(labels))
    caps = captions.choose(source.captions_of(ids), config.seed, 0, ids)  # the pipeline's epoch-0 pick
    ref.update({f"retrieval_{k}": v for k, v in
                _rank_recall(_unit(img) @ _unit(text(caps)).T, (1, 5, 10)).items()})
    return ref


def test_image_text_report_equals_numpy_from_the_models_own_embeddings():
    config, source, model, variables, rows = _digits_model()
    mesh = protocols.eval_mesh()
    assert mesh.size == 8
    got = zero_shot.image_text_report(model, parallel.replicate(variables, mesh), config, mesh, source=source)
    want = _reference(config, source, model, variables, rows)
    assert set(got) == set(want)
    n = len(rows["label"])
    for key, value in want.items():
        # float32 towers vs float64 scoring: a near-tie could flip one example (1/n)
        assert abs(got[key] - value) <= 1 / n + 1e-6, (key, got[key], value)
    assert sum(abs(got[k] - want[k]) > 1e-6 for k in want) <= 1
    assert 0 < got["zero_shot_top5"] < 1


def test_final_report_of_a_two_tower_model_has_the_image_text_metrics(monkeypatch):
    config, source, model, variables, _ = _digits_model()
    monkeypatch.setattr(run_eval, "split_features", lambda *a, **k: protocols.FeatureSet(
        np.eye(20, 4), np.arange(20) % 2, np.eye(20, 4), np.arange(20) % 2, 2))
    monkeypatch.setattr(sources, "load_source", lambda *a, **k: source)  # the 37-image test split
    config.eval.knn_k = (5,)
    result = run_eval.evaluate_encoder(model, variables, config, protocols.eval_mesh())
    assert {"zero_shot_top1", "zero_shot_top5", "retrieval_i2t_r10", "retrieval_t2i_r1"} <= set(result)
    table = run_eval.format_report({"pretrained": result}, "/tmp")
    assert "zero_shot_top1" in table and "retrieval_t2i_r10" in table
