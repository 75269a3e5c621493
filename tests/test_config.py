"""Config files load, presets validate, and bad configs fail with one clear sentence."""
import glob
import os

import pytest

from clrjax import config as config_lib
from clrjax import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _digits(method="simclr"):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + ":digits")


METHOD_CONFIG_FILES = [p for p in CONFIG_FILES if os.path.basename(p) != "default.py"]


@pytest.mark.parametrize("path", METHOD_CONFIG_FILES, ids=os.path.basename)
@pytest.mark.parametrize("preset", presets.PRESETS)
def test_every_preset_of_every_method_validates(path, preset):
    config = config_lib.load_config_file(f"{path}:{preset}")
    config_lib.validate_config(config, num_devices=8)
    assert config.method == os.path.basename(path)[:-3]


@pytest.mark.parametrize("method", ["simclr", "supcon", "tests.plugins.ema_cosine"])
@pytest.mark.parametrize("preset", presets.PRESETS)
def test_default_config_runs_any_method_on_any_preset(method, preset):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"default.py:{preset},method={method}"))
    config_lib.validate_config(config, num_devices=8)
    assert config.method == method


def test_default_config_needs_a_method_and_method_files_refuse_another():
    with pytest.raises(ValueError, match=r"needs the method in its argument: PRESET,method=NAME"):
        config_lib.load_config_file(os.path.join(ROOT, "configs", "default.py:digits"))
    with pytest.raises(ValueError, match=r"this config file trains simclr.*configs/default.py:digits,method=tico"):
        config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py:digits,method=tico"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_files_document_their_command(path):
    source = open(path).read()
    assert "COMMAND:" in source and "experiments/train.py" in source


def test_base_config_fields_each_have_a_comment():
    source = open(os.path.join(ROOT, "clrjax", "config.py")).read()
    body = source.split("def base_config")[1].split("return c")[0]
    assignments = [ln for ln in body.splitlines() if ln.strip().startswith("c.") and " = " in ln]
    assert assignments, "base_config has no field assignments"
    undocumented = [ln.strip() for ln in assignments if "#" not in ln]
    assert not undocumented, undocumented


BAD_CONFIGS = [
    ({"batch_sise": 256}, "batch_sise", "batch_size"),
    ({"method": "simclrr"}, "config.method", "simclr"),
    ({"dataset.name": "cifar11"}, "config.dataset.name", "cifar10"),
    ({"optimizer.name": "adam"}, "config.optimizer.name", "adamw"),
    ({"optimizer.lr": 0.0}, "config.optimizer.lr", "positive"),
    ({"optimizer.lr": -1.0}, "config.optimizer.lr", "positive"),
    ({"probe.lr": 0.0}, "config.probe.lr", "positive"),
    ({"loss.temperature": 0.0}, "config.loss.temperature", "positive"),
    ({"loss.temperature": -0.1}, "config.loss.temperature", "positive"),
    ({"loss.lambd": 0.1}, "config.loss.lambd", "temperature"),
    ({"batch_size": 250}, "config.batch_size", "multiple of 8"),
    ({"batch_size": 0}, "config.batch_size", "positive"),
    ({"model.name": "resnet9"}, "config.model", "resnet18"),
    ({"augment.flip_prob": 1.5}, "config.augment.flip_prob", "[0, 1]"),
    ({"augment.crop_scale": (0.5, 0.2)}, "config.augment.crop_scale", "min <= max"),
    ({"num_steps": 0, "num_epochs": 0.0}, "config.num_steps", "nothing to train"),
    ({"nonfinite.policy": "ignore"}, "config.nonfinite.policy", "skip"),
    ({"optimizer.lr_scaling": "quadratic"}, "config.optimizer.lr_scaling", "sqrt"),
]


@pytest.mark.parametrize("overrides,field,fix", BAD_CONFIGS, ids=[str(b[0]) for b in BAD_CONFIGS])
def test_bad_config_fails_with_field_and_fix(overrides, field, fix):
    config = _digits()
    config = _override_unchecked(config, overrides)
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate_config(config, num_devices=8)
    message = str(err.value)
    assert field in message and fix in message, message


def _override_unchecked(config, overrides):
    """Applies overrides, creating unknown keys (the validator must catch them)."""
    config = config_lib.apply_overrides(config, {k: v for k, v in overrides.items() if _known(config, k)})
    for key, value in overrides.items():
        if not _known(config, key):
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def _known(config, dotted):
    node = config
    for part in dotted.split("."):
        if part not in node:
            return False
        node = node[part]
    return True


def test_apply_overrides_rejects_unknown_field():
    with pytest.raises(config_lib.ConfigError, match="optimizer.lrr"):
        config_lib.apply_overrides(_digits(), {"optimizer.lrr": 0.1})


def test_apply_overrides_copies():
    config = _digits()
    changed = config_lib.apply_overrides(config, {"optimizer.lr": 0.5, "loss.temperature": 0.3})
    assert changed.optimizer.lr == 0.5 and changed.loss.temperature == 0.3
    assert config.optimizer.lr != 0.5


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="fashion_mnist"):
        config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":mnist")


def test_missing_config_file():
    with pytest.raises(config_lib.ConfigError, match="does not exist"):
        config_lib.load_config_file("configs/nope.py:digits")


def _load(method, arg):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + f":{arg}")


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "vit_tiny", "cnn_small"])
def test_encoder_option_replaces_the_presets_encoder(encoder):
    from clrjax import models

    config = _load("barlow_twins", f"cifar10,encoder={encoder}")
    config_lib.validate_config(config, num_devices=8)
    resolved = models.resolve_model_config(config.model)
    # Exactly the new encoder's fields, every one present so the command line can override it.
    assert set(config.model.keys()) == set(resolved)
    assert config.model.name == encoder
    preset = _load("barlow_twins", "cifar10")
    assert config.loss.to_dict() == preset.loss.to_dict()  # only the encoder changed
    assert config.projector.to_dict() == preset.projector.to_dict()


def test_encoder_option_gives_a_small_image_resnet_the_cifar_stem():
    config = _load("simclr", "fashion_mnist,encoder=resnet18")  # 28 px crops
    config_lib.validate_config(config, num_devices=8)
    assert config.model.cifar_stem is True
    assert config.model.dtype == _load("simclr", "fashion_mnist").model.dtype
    assert _load("simclr", "imagenet,encoder=resnet18").model.cifar_stem is False  # 224 px


def test_every_encoder_field_is_listed_and_overridable():
    from clrjax import models

    config = _load("vicreg", "imagenet")
    assert set(config.model.keys()) == set(models.resolve_model_config(config.model))
    changed = config_lib.apply_overrides(config, {"model.zero_init_residual": True})
    config_lib.validate_config(changed, num_devices=8)
    assert changed.model.zero_init_residual is True


@pytest.mark.parametrize("arg, match", [
    ("fashion_mnist,encoder=resnet19", "not an encoder.*resnet18"),
    ("fashion_mnist,width=2", "PRESET\\[,encoder=NAME\\]"),
    ("fashion_mnist,encoder", "PRESET\\[,encoder=NAME\\]"),
    ("fashion_mnist,encoder=resnet18,encoder=resnet50", "given twice"),
])
def test_bad_config_argument_option(arg, match):
    with pytest.raises(ValueError, match=match):
        _load("simclr", arg)


def test_changing_model_name_alone_points_to_the_encoder_option():
    config = config_lib.apply_overrides(_load("simclr", "fashion_mnist"), {"model.name": "resnet18"})
    with pytest.raises(config_lib.ConfigError, match="fashion_mnist,encoder=resnet18"):
        config_lib.validate_config(config)
