"""CLIP, SigLIP and LiT through the trainer (clrjax/methods/image_text.py).

The losses' values, gradients and 1-vs-2/8-device equality (shard_map, pmap)
and resume are the shared harness's (tests/methods/test_harness.py runs every
registered method, clip and siglip included, against float64 references).
Here: the class-name captions reach the batch; LiT keeps the pretrained
image tower bit-identical (parameters and BatchNorm statistics) with no
optimizer state while the text side trains; an unlocked tower starts from
the checkpoint and moves; gradient caching gives the full-batch gradient of
both towers; bad LiT inputs fail before compiling.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib, parallel, train
from clrjax.data import pipeline
from clrjax.data.class_captions import DIGIT_NAMES, TEMPLATES
from clrjax.models import encoders
from tests.methods.test_harness import tiny_config
from tests.test_gradient_cache import MICRO_VIT, assert_trees_close, exact_config, grads_and_aux


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    """A finished 2-step SimCLR run on digits: the image tower LiT starts from."""
    workdir = str(tmp_path_factory.mktemp("simclr"))
    result = train.train(tiny_config("simclr", num_steps=2), workdir)
    return workdir, jax.device_get(result.state)


def _steps(config, num_devices=1, steps=2):
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    state, step_fn = train.init_train_state(exp), train.make_train_step(exp)
    initial = jax.device_get(state)
    with pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0) as loader:
        for _ in range(steps):
            state, _ = step_fn(state, parallel.host_to_global(train.model_batch(next(loader)), mesh))
    return exp, initial, jax.device_get(state)


def _size(tree) -> int:
    return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


def test_captions_are_the_class_templates():
    config = tiny_config("clip")
    exp = train.build_experiment(config, parallel.make_mesh(jax.devices()[:1]))
    with pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0) as loader:
        batch = next(loader)
    tokenizer = exp.train_source.tokenizer
    for tokens, label in zip(batch["text"], batch["label"]):
        caption = tokenizer.decode(tokens.tolist())
        assert caption in [t.format(DIGIT_NAMES[label]) for t in TEMPLATES], caption


@pytest.mark.parametrize("name", ["clip", pytest.param("siglip", marks=pytest.mark.slow)])
def test_lit_locked_tower_is_bit_identical_and_has_no_optimizer_state(name, simclr_run):
    workdir, pretrained = simclr_run
    lit = tiny_config(name, **{"image_tower.init_from": workdir, "image_tower.locked": True,
                               "optimizer.name": "adamw", "optimizer.lr": 1e-3})
    exp, initial, state = _steps(lit)
    for part in ("params", "batch_stats"):
        jax.tree.map(np.testing.assert_array_equal, getattr(state, part)["encoder"],
                     getattr(pretrained, part)["encoder"])
        jax.tree.map(np.testing.assert_array_equal, getattr(initial, part)["encoder"],
                     getattr(pretrained, part)["encoder"])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params["text_encoder"],
                         initial.params["text_encoder"])
    assert min(jax.tree.leaves(moved)) >= 0 and max(jax.tree.leaves(moved)) > 0, "the text tower must train"
    assert float(np.max(np.abs(state.params["image_projection"]["kernel"]
                               - initial.params["image_projection"]["kernel"]))) > 0
    # AdamW keeps two moments per trained parameter; the locked encoder must have none.
    unlocked = train.init_train_state(train.build_experiment(
        tiny_config(name, **{"optimizer.name": "adamw"}), parallel.make_mesh(jax.devices()[:1])))
    assert _size(unlocked.opt_state) - _size(state.opt_state) == 2 * _size(pretrained.params["encoder"])


def test_unlocked_tower_starts_from_the_checkpoint_and_trains(simclr_run):
    workdir, pretrained = simclr_run
    _, initial, state = _steps(tiny_config("clip", **{"image_tower.init_from": workdir}))
    jax.tree.map(np.testing.assert_array_equal, initial.params["encoder"], pretrained.params["encoder"])
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state.params["encoder"],
                         pretrained.params["encoder"])
    assert max(jax.tree.leaves(moved)) > 0


@pytest.mark.slow  # the harness's 8-vs-1 loss and step tests cover the sharding; this adds the lock
def test_lit_on_8_devices_equals_1_device(simclr_run):
    workdir, _ = simclr_run
    lit = tiny_config("siglip", **{"image_tower.init_from": workdir, "image_tower.locked": True})
    (_, _, s8), (_, _, s1) = _steps(lit, 8, 1), _steps(lit, 1, 1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), s8.params, s1.params)


@pytest.fixture()
def micro_vit():
    encoders.ENCODERS.register(MICRO_VIT)
    yield
    encoders.ENCODERS.unregister("vit_micro")


@pytest.mark.parametrize("name", ["siglip", pytest.param("clip", marks=pytest.mark.slow)])
def test_gradient_cache_gives_the_full_batch_gradient_of_both_towers(name, micro_vit):
    """ViT image tower (no cross-example statistics), 4 micro-batches of 8 on 8 devices."""
    (cached, _, aux), _ = grads_and_aux(exact_config(name, "vit", 8), 8)
    (full, _, want_aux), _ = grads_and_aux(exact_config(name, "vit", 0), 8)
    for tower in ("encoder", "text_encoder", "image_projection", "text_projection"):
        assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(full[tower])) > 0, tower
    assert_trees_close(cached, full, f"{name} gradient")
    # aux = (method_state, metrics, loss, probe loss, probe accuracy). In-batch top-1 accuracies are
    # left out: a batch repeats captions (10 classes x 8 templates), and equal captions tie exactly,
    # so round-off decides them.
    _, metrics, loss, probe_loss, _ = aux
    _, want_metrics, want_loss, want_probe_loss, _ = want_aux
    drop = lambda m: {k: v for k, v in m.items() if not k.endswith("accuracy")}  # noqa: E731
    assert_trees_close((drop(metrics), loss, probe_loss), (drop(want_metrics), want_loss, want_probe_loss),
                       f"{name} loss and metrics")


@pytest.mark.parametrize("overrides, message", [
    ({"image_tower.locked": True},
     "config.image_tower.locked is True but config.image_tower.init_from is empty"),
    ({"image_tower.init_from": "/nonexistent/run"},
     "config.image_tower.init_from is '/nonexistent/run', which is neither a run directory"),
    ({"dataset.name": "digits"}, "config.dataset.name is 'digits', which has no captions, but clip trains"),
])
def test_bad_image_tower_config_fails_in_validation(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(")):
        config_lib.validate_config(tiny_config("clip", **overrides), num_devices=1)


def test_checkpoint_of_another_architecture_fails_before_compiling(simclr_run):
    workdir, _ = simclr_run
    config = tiny_config("clip", **{"image_tower.init_from": workdir, "model.widths": (8, 32)})
    with pytest.raises(config_lib.ConfigError,
                       match=rf"config.image_tower.init_from='{workdir}' does not fit config.model: .*kernel has shape"):
        train.build_experiment(config, parallel.make_mesh(jax.devices()[:1]))


# -- distinct captions encoded once (TwoTower.distinct_texts)

def _caption_rows(rng, n_distinct, n, context=16):
    """n token rows drawn from n_distinct different random captions (each used at least once)."""
    from tests.models.test_text import _tokens
    distinct = _tokens(rng, n_distinct, rng.integers(1, context - 2, n_distinct), context)
    while len(np.unique(distinct, axis=0)) < n_distinct:  # random captions could coincide
        distinct = _tokens(rng, n_distinct, rng.integers(1, context - 2, n_distinct), context)
    which = np.concatenate([np.arange(n_distinct), rng.integers(0, n_distinct, n - n_distinct)])
    return distinct[rng.permutation(which)]


def test_distinct_rows_rebuild_every_row():
    from clrjax.methods.image_text import distinct_rows
    rng = np.random.default_rng(0)
    tokens = _caption_rows(rng, 5, 24)
    rows, inverse, fits = jax.jit(distinct_rows, static_argnums=1)(tokens, 6)
    assert bool(fits)
    np.testing.assert_array_equal(np.asarray(rows)[np.asarray(inverse)], tokens)
    assert len(np.unique(np.asarray(rows)[:5], axis=0)) == 5  # five distinct rows, one slot each
    assert not bool(jax.jit(distinct_rows, static_argnums=1)(_caption_rows(rng, 7, 24), 6)[2])


@pytest.mark.parametrize("n_distinct", [5, 10])  # 10 > distinct_texts=6: the row-by-row branch
def test_distinct_text_encoding_equals_row_by_row(n_distinct):
    """Value and gradient (every parameter) equal the row-by-row tower's; the embeddings also equal a
    float64 NumPy forward (the text tower's reference, tests/models/test_text.py, then the projection)."""
    from clrjax import methods
    from tests.models.test_text import _reference
    config = tiny_config("clip", **{"text.context_length": 16})
    model = methods.get("clip").build_model(config, 10)
    assert model.distinct_texts == 10 * len(TEMPLATES)  # digits_captions: 10 classes x the templates
    rng = np.random.default_rng(n_distinct)
    tokens = _caption_rows(rng, n_distinct, 24)
    inputs = {"image": np.zeros((24, 8, 8, 1), np.float32), "text": tokens}
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(1), inputs["image"], train=False))()
    cotangent = rng.normal(size=(24, int(config.projector.out_dim))).astype(np.float32)

    def value_and_grad(distinct_texts):
        m = model.clone(distinct_texts=distinct_texts)

        def objective(params):
            out = m.apply(dict(variables, params=params), inputs, train=False)["text_embeddings"]
            return jnp.sum(out * cotangent), out
        return jax.jit(jax.value_and_grad(objective, has_aux=True))(variables["params"])

    (_, once), grads_once = value_and_grad(6)
    (_, each), grads_each = value_and_grad(0)
    np.testing.assert_allclose(once, each, rtol=1e-5, atol=1e-6)
    # float32: a parameter's gradient sums terms of both signs, so round-off is relative to the leaf's scale.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b)))),
                 grads_once, grads_each)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads_once["text_encoder"])) > 0
    tower = model.text_encoder
    want = _reference({"params": variables["params"]["text_encoder"]}, tokens, tower.heads, tower.causal,
                      tower.pooling, tower.pad_id, tower.end_id)
    want = want @ np.asarray(variables["params"]["text_projection"]["kernel"], np.float64)
    np.testing.assert_allclose(once, want, rtol=1e-4, atol=1e-5)
