"""Frozen parameters (config.optimizer.freeze), e.g. MoCo v3's random patch projection.

Chen, Xie & He 2021, sec. 4.2: the ViT's patch projection is kept at its random
initialisation; the official vits.py (stop_grad_conv1) sets requires_grad = False
on its weight and bias, so the optimizer neither updates them nor keeps state for
them. Checked here: the optimizer transform on its own (every optimizer, with
weight decay and clipping), and through the trainer: after a few steps the patch
embedding is bit-identical to its initialisation while the other parameters
moved, it has no optimizer state, the momentum target's copy stays equal to it,
and a stopped and resumed run ends bit-identical to an uninterrupted one.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import config as config_lib
from clrjax import optim, train
from clrjax.models import vit
from clrjax.models.encoders import ENCODERS, Encoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VIT = "vit_freeze_test"  # one block of width 32: the ViT layout, compiled in seconds
FROZEN = ("encoder/patch_embed",)


@pytest.fixture(scope="module", autouse=True)
def tiny_vit():
    ENCODERS.register(Encoder(
        name=TINY_VIT, defaults={"remat": False}, num_features=lambda cfg: 32, check_input=vit._check_input,
        build=lambda cfg, dtype: vit.ViT(dim=32, depth=1, num_heads=2, remat=cfg["remat"], dtype=dtype)))
    yield
    ENCODERS.unregister(TINY_VIT)


def _path_keys(path):
    return [getattr(k, "key", getattr(k, "name", None)) for k in path]


def _state_leaves_under(opt_state, name):
    """Optimizer-state leaves whose path passes through a key ``name``."""
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    return [jax.tree_util.keystr(p) for p, _ in flat if name in _path_keys(p)]


# --------------------------------------------------------------------------- the transform


def _params():
    rng = np.random.default_rng(0)
    shapes = {"encoder": {"patch_embed": {"kernel": (4, 4, 3, 8), "bias": (8,)},
                          "patch_embed_2": {"kernel": (8, 8)}, "norm": {"scale": (8,)}},
              "projector": {"dense_0": {"kernel": (8, 4)}}}
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))


def _opt_cfg(name):
    return {**config_lib.base_config().optimizer.to_dict(), "name": name, "lr": 0.1, "weight_decay": 0.1,
            "warmup_epochs": 0.0, "grad_clip_norm": 1.0}


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_frozen_leaves_never_move_and_the_rest_train_as_without_them(name):
    params = _params()
    tx, _ = optim.build_optimizer({**_opt_cfg(name), "freeze": FROZEN}, global_batch=8, total_steps=10,
                                  steps_per_epoch=5)
    plain, _ = optim.build_optimizer(_opt_cfg(name), global_batch=8, total_steps=10, steps_per_epoch=5)
    rest = {"encoder": {k: v for k, v in params["encoder"].items() if k != "patch_embed"},
            "projector": params["projector"]}
    state, plain_state = tx.init(params), plain.init(rest)
    assert _state_leaves_under(state, "patch_embed") == []
    assert _state_leaves_under(state, "patch_embed_2")  # a name sharing the prefix is not frozen
    p, q = params, rest
    for step in range(3):
        grads = jax.tree.map(lambda x: jnp.full_like(x, 1.0 + step), p)  # weight decay alone would move them
        updates, state = tx.update(grads, state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
        plain_updates, plain_state = plain.update({"encoder": {k: v for k, v in grads["encoder"].items()
                                                               if k != "patch_embed"},
                                                   "projector": grads["projector"]}, plain_state, q)
        q = jax.tree.map(lambda a, u: a + u, q, plain_updates)
    jax.tree.map(np.testing.assert_array_equal, p["encoder"]["patch_embed"], params["encoder"]["patch_embed"])
    # Clipping and the optimizer see only the trained leaves: the same numbers as a tree without the frozen ones.
    jax.tree.map(np.testing.assert_array_equal, {"encoder": {k: v for k, v in p["encoder"].items()
                                                             if k != "patch_embed"},
                                                 "projector": p["projector"]}, q)
    assert not np.array_equal(p["encoder"]["patch_embed_2"]["kernel"], params["encoder"]["patch_embed_2"]["kernel"])


def test_freeze_rejects_paths_that_are_not_strings():
    with pytest.raises(ValueError, match=r"opt_cfg.freeze must be a tuple of parameter paths"):
        optim.build_optimizer({**_opt_cfg("sgd"), "freeze": "encoder/patch_embed"}, global_batch=8,
                              total_steps=10, steps_per_epoch=5)


# --------------------------------------------------------------------------- presets and validation


@pytest.mark.parametrize("arg,frozen", [("imagenet,encoder=vit_small", FROZEN), ("imagenet", ()),
                                        ("cifar10,encoder=vit_base", FROZEN), ("digits", ())])
def test_moco_v3_freezes_the_patch_embedding_of_every_vit(arg, frozen):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "moco_v3.py") + ":" + arg)
    assert tuple(config.optimizer.freeze) == frozen


@pytest.mark.parametrize("paths,phrase", [
    (("probe",), "names 'probe', the online probe, which config.optimizer does not train"),
    (("encoder/nothing_here",), "names 'encoder/nothing_here', but this simclr model with the cnn_small encoder "
                                "has no such parameters; name a module of it such as"),
])
def test_bad_frozen_paths_fail_in_config_validation(paths, phrase):
    config = config_lib.apply_overrides(config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py:digits")),
                                        {"optimizer.freeze": paths})
    with pytest.raises(config_lib.ConfigError, match=phrase.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate_config(config, num_devices=8)


# --------------------------------------------------------------------------- through the trainer


def _vit_config(method):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + f":digits,encoder={TINY_VIT}")
    return config_lib.apply_overrides(config, {
        "augment.crop_size": 16, "projector.hidden_dims": (32,), "projector.out_dim": 16,
        "predictor.hidden_dims": (32,), "batch_size": 32, "num_steps": 4, "log_every_steps": 1,
        "checkpoint.every_steps": 100, "checkpoint.async_save": False, "eval.final": False,
        # AdamW with decoupled weight decay: a frozen leaf left to the optimizer would shrink.
        "optimizer.name": "adamw", "optimizer.lr": 1e-3, "optimizer.weight_decay": 0.1,
        "optimizer.warmup_epochs": 0.05, "optimizer.freeze": FROZEN})


def _check_frozen_and_trained(state, initial):
    patch = state.params["encoder"]["patch_embed"]
    assert set(patch) == {"kernel", "bias"}
    jax.tree.map(np.testing.assert_array_equal, patch, initial["encoder"]["patch_embed"])
    moved = {k: float(np.max(np.abs(state.params["encoder"][k] - initial["encoder"][k])))
             for k in ("cls_token", "pos_embed")}
    assert min(moved.values()) > 0, moved
    assert _state_leaves_under(state.opt_state, "patch_embed") == []


def test_moco_v3_patch_embedding_stays_at_init_and_resume_is_exact(tmp_path):
    config = _vit_config("moco_v3")
    whole = train.train(config, str(tmp_path / "whole"))
    final = jax.device_get(whole.state)
    _check_frozen_and_trained(final, jax.device_get(train.init_train_state(whole.exp).params))
    # The momentum encoder's copy is the EMA of equal values: it stays equal too.
    target = final.method_state["target"]["params"]["encoder"]["patch_embed"]
    jax.tree.map(np.testing.assert_array_equal, target, final.params["encoder"]["patch_embed"])
    for stop in (2, None):
        resumed = train.train(config, str(tmp_path / "resumed"), stop_after_steps=stop)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.state), final)


def test_freeze_works_for_a_method_without_a_target(tmp_path):
    config = config_lib.apply_overrides(_vit_config("simclr"), {"num_steps": 2})
    result = train.train(config, str(tmp_path / "run"))
    _check_frozen_and_trained(jax.device_get(result.state), jax.device_get(train.init_train_state(result.exp).params))
