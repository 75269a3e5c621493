"""A method, a dataset and an encoder defined outside clrjax train through the unchanged trainer.

Each is one module (or a few lines here) plus one registration (a module path
in the config, or ``Registry.register``): the mechanism behind "a new method,
model or dataset is one file plus one line".
"""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib, models, parallel, train
from clrjax.data import pipeline
from clrjax.data.datasets import DATASETS, Dataset
from clrjax.data.sources import ArraySource
from clrjax.models.encoders import ENCODERS, Encoder
from tests.plugins import ema_cosine

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model.widths": (8, 16), "projector.hidden_dims": (16,), "projector.out_dim": 8,
        "batch_size": 32, "num_steps": 3, "log_every_steps": 1, "checkpoint.every_steps": 100,
        "checkpoint.async_save": False, "eval.final": False,
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0}


def _config(spec, **overrides):
    return config_lib.apply_overrides(config_lib.load_config_file(os.path.join(ROOT, "configs", spec)),
                                      dict(TINY, **overrides))


def _steps(config, num_devices, steps):
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    state, step_fn = train.init_train_state(exp), train.make_train_step(exp)
    initial = jax.device_get(state)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    history = []
    for _ in range(steps):
        state, metrics = step_fn(state, parallel.host_to_global(train.model_batch(next(loader)), mesh))
        history.append(jax.device_get(state))
    loader.close()
    return initial, history


# --------------------------------------------------------------------------- a method by module path


def test_method_by_module_path_runs_its_forward_state_and_after_update_hook():
    config = _config("default.py:digits,method=tests.plugins.ema_cosine")
    initial, history = _steps(config, 8, 2)
    # The target (method state) is the EMA of the online parameters, updated after each step.
    expected = initial.params
    for state in history:
        expected = jax.tree.map(lambda t, p: ema_cosine.TAU * t + (1 - ema_cosine.TAU) * p, expected,
                                state.params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                     state.method_state["target"], expected)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), history[-1].method_state["target"],
                         initial.method_state["target"])
    assert max(jax.tree.leaves(moved)) > 0
    # ... and it is device-count invariant like every built-in method (tolerance as the harness).
    _, history1 = _steps(config, 1, 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 history[-1].method_state, history1[-1].method_state)


def test_method_by_module_path_resumes_bit_exact(tmp_path):
    config = _config("default.py:digits,method=tests.plugins.ema_cosine")
    whole = jax.device_get(train.train(config, str(tmp_path / "whole")).state)
    for stop in (1, None):
        resumed = train.train(config, str(tmp_path / "resumed"), stop_after_steps=stop)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), whole)


def test_unknown_method_module_is_one_sentence():
    config = _config("simclr.py:digits")
    config.method = "tests.plugins.no_such_module"
    with pytest.raises(config_lib.ConfigError, match=r"config.method is 'tests.plugins.no_such_module', which is not "
                                                     r"supported; use one of simclr, barlow_twins.*No module named"):
        config_lib.validate_config(config)


# --------------------------------------------------------------------------- a dataset without a preset


@pytest.fixture
def blobs_dataset():
    """Three classes of 12x12 RGB images, each a colour plus noise (no preset exists for it)."""
    def load(cfg, split):
        rng = np.random.default_rng(0 if split == "train" else 1)
        labels = rng.integers(0, 3, 96)
        colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]])
        images = colours[labels][:, None, None, :] + rng.integers(0, 50, (96, 12, 12, 3))
        return ArraySource(images.clip(0, 255).astype(np.uint8), labels, num_classes=3)

    entry = DATASETS.register(Dataset("blobs_test", load, lambda cfg: ((12, 12, 3), 3), splits=("train", "test"),
                                      defaults={"augment.crop_size": 12, "augment.mean": (0.4, 0.4, 0.4)}))
    yield entry
    DATASETS.unregister("blobs_test")


def test_registered_dataset_trains_without_a_preset(blobs_dataset, tmp_path):
    config = _config("simclr.py:blobs_test")
    assert config.dataset.name == "blobs_test" and config.augment.crop_size == 12   # the entry's defaults
    assert tuple(config.augment.mean) == (0.4, 0.4, 0.4)
    result = train.train(config, str(tmp_path))
    assert int(result.state.step) == 3 and np.isfinite(result.final_metrics["loss"])


def test_dataset_split_names_are_checked_before_loading(blobs_dataset):
    config = _config("simclr.py:blobs_test", **{"dataset.test_split": "validation"})
    with pytest.raises(config_lib.ConfigError, match=r"config.dataset.test_split is 'validation', which blobs_test does not have; its splits are 'train' and 'test'"):
        config_lib.validate_config(config)


# --------------------------------------------------------------------------- an encoder


class _Mlp(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train: bool):
        del train
        return nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1))).astype(jnp.float32)


@pytest.fixture
def mlp_encoder():
    entry = ENCODERS.register(Encoder("mlp_test", lambda cfg, dtype: _Mlp(cfg["width"]), {"width": 24},
                                      num_features=lambda cfg: cfg["width"], check_input=lambda cfg, size: None))
    yield entry
    ENCODERS.unregister("mlp_test")


def test_registered_encoder_is_a_config_choice_with_its_fields(mlp_encoder, tmp_path):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py:digits,encoder=mlp_test"))
    assert config.model.width == 24                          # the entry's field, overridable
    config = config_lib.apply_overrides(config, {**{k: v for k, v in TINY.items() if k != "model.widths"},
                                                 "model.width": 20})
    result = train.train(config, str(tmp_path))
    assert result.state.params["encoder"]["Dense_0"]["kernel"].shape == (64, 20)
    assert models.num_features(config.model) == 20
    with pytest.raises(ValueError, match=r"'width' must be of type int like its default 24, got 2.5"):
        models.resolve_model_config({"name": "mlp_test", "width": 2.5})
