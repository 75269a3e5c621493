"""Gradient caching (``config.micro_batch_size``): the exact global-batch gradient in micro-batches.

The reference is the trainer's own full-batch gradient (``jax.grad`` of the
global-batch loss, whose value and gradients the method harness checks
against float64 references of every paper's definition). Cached and
full-batch gradients differ only in float32 summation order, so they must
agree to 1e-5 relative: for every leaf, ``max|cached - full| <= 1e-5 *
max|full| + 1e-7 * max over all leaves`` (the second term covers leaves
whose gradient is ~0, where relative error is meaningless).

Encoders without cross-example statistics: a ViT (a 1-block, 16-wide ViT
with 4x4 patches registered below as ``vit_micro``) and a GroupNorm
ResNet-18 (``model.norm=group``), projector and predictor without
BatchNorm. With BatchNorm the cached gradient is the exact gradient of the
ghost-BatchNorm objective (statistics per micro-batch), checked against an
independent loop over the micro-batches (tolerance 1e-4: normalising by the
statistics of 16 rows amplifies round-off).
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib, gradient_cache, methods, parallel, train
from clrjax.data import augment, pipeline
from clrjax.models import encoders, vit
from tests.methods.test_harness import tiny_config

RTOL, FLOOR = 1e-5, 1e-7
BN_RTOL = 1e-4
BATCH = 32

MICRO_VIT = encoders.Encoder(
    name="vit_micro", build=lambda cfg, dtype: vit.ViT(dim=16, depth=1, num_heads=2, patch_size=4, dtype=dtype),
    defaults={}, num_features=lambda cfg: 16, check_input=lambda cfg, image_size: None,
    doc="a 1-block ViT with 4x4 patches, for tests")


@pytest.fixture(scope="module", autouse=True)
def micro_vit():
    encoders.ENCODERS.register(MICRO_VIT)
    yield
    encoders.ENCODERS.unregister("vit_micro")


ENCODER_FIELDS = {
    "vit": {"model.name": "vit_micro"},
    "gn_resnet": {"model.name": "resnet18", "model.norm": "group", "model.norm_groups": 4,
                  "model.width_multiplier": 0.0625, "model.cifar_stem": True},
}


def exact_config(name, encoder="vit", micro=0, **overrides):
    """A method's tiny digits config whose networks have no cross-example statistics."""
    config = tiny_config(name, **{"projector.use_bn": False, "predictor.use_bn": False,
                                  "batch_size": BATCH, "micro_batch_size": micro, **overrides})
    config.model = config_lib.ml_collections.ConfigDict({"name": "cnn_small", "dtype": "float32"})
    for field, value in ENCODER_FIELDS[encoder].items():
        config.model[field.split(".")[1]] = value
    return config


def grads_and_aux(config, num_devices, state=None):
    """One step's (grads, batch_stats, aux) on the first ``num_devices`` devices, on host."""
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    state = train.init_train_state(exp) if state is None else parallel.replicate(state, mesh)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    batch = parallel.host_to_global(train.model_batch(next(loader)), mesh)
    loader.close()
    grads_of = jax.jit(train.make_grad_fn(exp))
    return jax.device_get(grads_of(state, batch)), jax.device_get(state)


def assert_trees_close(actual, expected, what, rtol=RTOL):
    scale = max([float(np.max(np.abs(x))) for x in jax.tree.leaves(expected)] + [0.0])
    paths = jax.tree_util.tree_flatten_with_path(expected)[0]
    for (path, want), got in zip(paths, jax.tree.leaves(actual)):
        err, tol = np.max(np.abs(got - want)), rtol * np.max(np.abs(want)) + FLOOR * scale
        assert err <= tol, f"{what} {jax.tree_util.keystr(path)}: max error {err:.3g} > {tol:.3g}"


def check_equal_to_full_batch(name, encoder, micro, num_devices, batch=BATCH):
    (grads, stats, aux), _ = grads_and_aux(exact_config(name, encoder, micro, batch_size=batch), num_devices)
    (want_grads, want_stats, want_aux), _ = grads_and_aux(exact_config(name, encoder, 0, batch_size=batch),
                                                          num_devices)
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads)) > 0
    assert_trees_close(grads, want_grads, f"{name} gradient")
    assert_trees_close(stats, want_stats, f"{name} batch_stats")
    # aux = (method_state, loss_metrics, ssl_loss, probe_loss, probe_acc): the loss of the whole batch
    assert_trees_close(aux, want_aux, f"{name} loss, metrics and method state")


# The trainer's caching code does not branch on the method: the default suite checks a two-view
# stateless method (SimCLR) and one with a momentum target, a predictor and method state (BYOL),
# K = 4 and 8 with a ViT; the slow matrix runs every method, both encoders (ViT, GroupNorm
# ResNet), K = 2, 4, 8 on 1 and 8 devices. That GroupNorm has no cross-example statistics (what
# makes caching exact for it) is tested in tests/models/test_resnet.py.
@pytest.mark.parametrize("name", ("simclr", "byol"))
def test_cached_gradient_equals_full_batch(name):
    """ViT, 4 micro-batches of 8 on 8 devices (one example per device and micro-step)."""
    check_equal_to_full_batch(name, "vit", BATCH // 4, 8)


def test_eight_micro_batches_on_one_device():
    check_equal_to_full_batch("simclr", "vit", BATCH // 8, 1)


@pytest.mark.slow
@pytest.mark.parametrize("num_devices", [1, 8])
@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("encoder", list(ENCODER_FIELDS))
@pytest.mark.parametrize("name", methods.names())
def test_full_matrix(name, encoder, k, num_devices):
    """Every method x encoder x K in (2, 4, 8) x 1 and 8 devices (the tests above sample it).

    The batch grows to 64 where K micro-batches of 32 could not be spread over 8 devices."""
    batch = max(BATCH, k * num_devices)
    check_equal_to_full_batch(name, encoder, batch // k, num_devices, batch)


def test_split_and_merge_are_inverse_and_device_invariant():
    x = np.arange(24 * 3).reshape(24, 3)
    micro = np.asarray(gradient_cache.split(jnp.asarray(x), 4))
    assert micro.shape == (4, 6, 3)
    np.testing.assert_array_equal(micro[1], x[1::4])  # micro-batch k: rows k, k + K, ...
    np.testing.assert_array_equal(np.asarray(gradient_cache.merge(jnp.asarray(micro))), x)
    mesh = parallel.make_mesh(jax.devices()[:8])
    sharded = jax.device_put(x, parallel.batch_sharding(mesh))
    on_mesh = jax.jit(lambda a: gradient_cache.split(a, 3, mesh))(sharded)
    np.testing.assert_array_equal(np.asarray(on_mesh), np.asarray(gradient_cache.split(jnp.asarray(x), 3)))
    # take(k) reads micro-batch k in place: the same rows as split(...)[k], on one device and on the mesh.
    for k in range(3):
        taken = jax.jit(lambda a, i: gradient_cache.take(a, i, 3, mesh))(sharded, k)
        np.testing.assert_array_equal(np.asarray(taken), x[k::3])
        np.testing.assert_array_equal(np.asarray(gradient_cache.take(jnp.asarray(x), k, 3)), x[k::3])


# --------------------------------------------------------------------------- BatchNorm


def ghost_batchnorm_reference(config, state, batch, num_micro):
    """The ghost-BatchNorm objective's gradient by an explicit loop on one device.

    Each micro-batch (rows k, k + K, ...) goes through the networks on its
    own (its BatchNorm statistics), the outputs are put back in batch order,
    and the method's loss + the probe's are taken on the whole batch
    (axis_name=None); the running statistics are the mean of the
    micro-batches' updates.
    """
    exp = train.build_experiment(config, parallel.make_mesh(jax.devices()[:1]))
    method, model = exp.method, exp.model
    key = jax.random.fold_in(state.rng, state.step)
    rows = [np.arange(k, config.batch_size, num_micro) for k in range(num_micro)]

    def objective(params):
        outs, stats = [], []
        for r in rows:
            views = augment.views(batch["image"][r], batch["index"][r], key, config.augment.to_dict(),
                                  method.num_views)
            out, bs = method.forward(model, {"params": params, "batch_stats": state.batch_stats}, views,
                                     state.method_state, train=True)
            outs.append(out)
            stats.append(bs)
        order = np.argsort(np.concatenate(rows))
        outputs = jax.tree.map(lambda *xs: jnp.concatenate(xs)[order], *outs)
        loss, _, _ = method.loss({k: outputs[k] for k in method.loss_inputs}, batch, state.method_state,
                                 axis_name=None, **config_lib.loss_kwargs(config))
        labels = jnp.broadcast_to(batch["label"][:, None], outputs["probe_logits"].shape[:2])
        import optax
        probe = optax.softmax_cross_entropy_with_integer_labels(outputs["probe_logits"], labels).mean()
        return loss + probe, jax.tree.map(lambda *s: jnp.mean(jnp.stack(s), 0), *stats)

    return jax.jit(jax.grad(objective, has_aux=True))(state.params)


def test_batchnorm_caching_is_the_exact_gradient_of_ghost_batchnorm(caplog):
    """cnn_small + BatchNorm projector, 4 micro-batches on 8 devices vs the explicit ghost-BN loop;
    the trainer warns that this is not the global-BatchNorm gradient."""
    config = tiny_config("simclr", batch_size=BATCH, micro_batch_size=BATCH // 4)
    (grads, stats, _), state = grads_and_aux(config, 8)
    mesh = parallel.make_mesh(jax.devices()[:1])
    exp = train.build_experiment(config, mesh)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    batch = jax.tree.map(jnp.asarray, train.model_batch(next(loader)))
    loader.close()
    want_grads, want_stats = ghost_batchnorm_reference(config, state, batch, 4)
    # BN_RTOL: dividing by the standard deviation of 16 rows amplifies float32 round-off
    # (measured 1.5e-5 relative); a wrong objective is off by far more (the last check: > 1e-4 absolute).
    assert_trees_close(grads, want_grads, "ghost-BatchNorm gradient", rtol=BN_RTOL)
    assert_trees_close(stats, want_stats, "ghost-BatchNorm running statistics", rtol=BN_RTOL)
    with caplog.at_level(logging.WARNING):
        train.warn_ghost_batchnorm(config, state.batch_stats)
        train.warn_ghost_batchnorm(exact_config("simclr", "vit", BATCH // 4), {})
    assert [r.getMessage() for r in caplog.records if "ghost BatchNorm" in r.getMessage()] != []
    assert len([r for r in caplog.records if "ghost BatchNorm" in r.getMessage()]) == 1


# --------------------------------------------------------------------------- through the trainer


def test_several_steps_track_full_batch_and_resume_is_bit_exact(tmp_path):
    """4 SGD steps with micro-batches track 4 full-batch steps; 2 + 2 resumed equals 4 bit for bit."""
    cached = exact_config("simclr", "vit", BATCH // 4)
    whole = jax.device_get(train.train(cached, str(tmp_path / "whole")).state)
    full = jax.device_get(train.train(exact_config("simclr", "vit", 0), str(tmp_path / "full")).state)
    assert_trees_close(whole.params, full.params, "parameters after 4 steps")
    for stop in (2, None):
        resumed = train.train(cached, str(tmp_path / "resumed"), stop_after_steps=stop)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), whole)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("micro,devices,match", [
    (12, 1, "does not divide config.batch_size=32"),
    (4, 8, "spread over the 8 devices"),
    (-1, 1, "whole number >= 0"),
])
def test_bad_micro_batch_size(micro, devices, match):
    config = tiny_config("simclr", batch_size=BATCH)
    config.micro_batch_size = micro
    with pytest.raises(config_lib.ConfigError, match=match) as err:
        config_lib.validate_config(config, num_devices=devices)
    assert "\n" not in str(err.value) and "--config.micro_batch_size" in str(err.value)


def test_method_that_mixes_examples_is_refused():
    import dataclasses
    mixing = dataclasses.replace(methods.get("simclr"), name="mixing", supports_gradient_cache=False)
    methods.METHODS.register(mixing)
    try:
        config = tiny_config("simclr", batch_size=BATCH, micro_batch_size=8)
        config.method = "mixing"
        with pytest.raises(config_lib.ConfigError, match="does not support gradient caching"):
            config_lib.validate_config(config, num_devices=1)
    finally:
        methods.METHODS.unregister("mixing")
