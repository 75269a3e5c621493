"""Dataset/architecture presets shared by the four method configs.

``configs/<method>.py:<preset>`` starts from :func:`clrjax.config.base_config`,
applies :func:`apply_dataset_preset` (data, augmentation, encoder) and then the
method's own recipe (loss, projector, optimizer, batch, epochs), so each
method file holds only what its paper specifies.

The config argument is ``PRESET[,encoder=NAME]``: ``encoder=`` replaces the
preset's encoder by another at that encoder's defaults (:func:`switch_encoder`).
Setting ``--config.model.name`` alone would keep the preset's encoder-specific
fields (e.g. cnn_small's ``widths``), which the new encoder rejects.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

PRESETS = ("digits", "fashion_mnist", "cifar10", "cifar100", "imagenet")
CONFIG_ARG_OPTIONS = ("encoder", "method")
CPU_PRESETS = ("digits", "fashion_mnist")  # sized for a 2-core CPU; apply_cpu_recipe trains them
# Below this crop size a ResNet gets the CIFAR stem (3x3 stride 1, no max-pool;
# SimCLR app. B.9 uses it at 32 px): the ImageNet stem's stride 4 would leave a
# final feature map of at most 1x1 after the stages' further stride 8.
CIFAR_STEM_BELOW = 64

# Channel statistics used for normalisation after augmentation.
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_preset(arg: str | None, default: str = "digits") -> str:
    """A preset name, or the name of a registered dataset that has none (its own defaults apply)."""
    from clrjax.data.datasets import DATASETS

    preset = (arg or default).strip()
    if preset not in PRESETS and preset not in DATASETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)} or a registered "
                         f"dataset ({', '.join(DATASETS.names())}), e.g. --config=configs/simclr.py:digits.")
    return preset


def parse_config_arg(arg: Optional[str], default: str = "digits") -> Tuple[str, Dict[str, str]]:
    """``'PRESET[,key=value...]'`` -> ``(preset, {key: value})``; keys from CONFIG_ARG_OPTIONS."""
    preset, *items = [part.strip() for part in (arg or default).split(",")]
    options: Dict[str, str] = {}
    for item in items:
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not value or key not in CONFIG_ARG_OPTIONS:
            raise ValueError(f"config argument option {item!r} is not understood; the argument is "
                             f"PRESET[,encoder=NAME], e.g. --config=configs/simclr.py:fashion_mnist,encoder=resnet18 "
                             f"(configs/default.py also takes method=NAME).")
        if key in options:
            raise ValueError(f"config argument option {key!r} is given twice in {arg!r}.")
        options[key] = value
    return parse_preset(preset, default), options


def switch_encoder(c, name: str) -> None:
    """Replaces ``c.model`` by encoder ``name`` at its defaults, keeping the preset's dtype.

    A ResNet on crops smaller than CIFAR_STEM_BELOW pixels gets the CIFAR stem.
    """
    import ml_collections

    from clrjax import models

    if name not in models.ENCODERS:
        raise ValueError(f"encoder={name!r} is not an encoder; use one of {', '.join(models.encoder_names())}.")
    c.model = ml_collections.ConfigDict({"name": name, "dtype": c.model.dtype})
    if name.startswith("resnet") and c.augment.crop_size < CIFAR_STEM_BELOW:
        c.model.cifar_stem = True


def fill_model_defaults(c) -> None:
    """Adds every keyword of the chosen encoder, at its default, to ``c.model``.

    As for the loss (:func:`clrjax.config.fill_loss_defaults`): config.json then
    records the whole encoder, and every field can be overridden on the command
    line, which ml_collections only allows for fields that exist.
    """
    from clrjax import models

    for field, value in models.resolve_model_config(c.model).items():
        if field not in c.model:
            c.model[field] = tuple(value) if isinstance(value, list) else value


def apply_dataset_preset(c, preset: str) -> None:
    """Fills dataset, augment and model fields of config ``c`` for ``preset``.

    A registered dataset without a preset gets the base config with the
    dataset's own ``defaults`` (its registry entry). Also lists every keyword
    of ``c.method``'s loss in ``c.loss`` at its default.
    """
    from clrjax import config as config_lib  # local: clrjax.config imports nothing from here

    config_lib.fill_loss_defaults(c)
    presets = {"digits": _digits, "fashion_mnist": _fashion_mnist, "cifar10": _cifar10,
               "cifar100": _cifar100, "imagenet": _imagenet}
    if preset in presets:
        presets[preset](c)
    else:
        _registered_dataset(c, preset)


def _registered_dataset(c, name: str) -> None:
    from clrjax.data.datasets import DATASETS

    c.dataset.name = name
    for dotted, value in DATASETS.get(name).defaults.items():
        *parents, leaf = dotted.split(".")
        node = c
        for parent in parents:
            node = node[parent]
        node[leaf] = value


def _small_grayscale_augment(c, crop_size: int, flip_prob: float) -> None:
    """Gentle augmentation for tiny grayscale images: a crop of 8x8 pixels has
    little room, so the crop keeps at least 40% of the area, and blur and
    solarisation (which destroy most of the signal at this size) are off."""
    a = c.augment
    a.crop_size = crop_size
    a.crop_scale = (0.4, 1.0)
    a.flip_prob = flip_prob
    a.jitter_strength = 0.5
    a.jitter_prob = 0.8
    a.gray_prob = 0.0          # one channel already
    a.blur_prob = (0.0, 0.0)
    a.solarize_prob = (0.0, 0.0)


def _digits(c) -> None:
    c.dataset.name = "digits"          # scikit-learn's 8x8 digits: ships in the wheel, works offline
    _small_grayscale_augment(c, crop_size=8, flip_prob=0.0)  # mirrored digits are other symbols
    c.augment.mean = (0.27,)           # digits pixel mean in [0, 1] (measured on the train split)
    c.augment.std = (0.38,)            # digits pixel std
    c.model.name = "cnn_small"         # 4 conv layers 32-64-128-128 (~1,580 img/s train step on 2 CPU cores, measured)
    c.model.widths = (32, 64, 128, 128)  # channel widths of the four conv layers
    c.model.stem_stride = 1            # 8x8 input: no downsampling in the stem
    c.eval.batch_size = 512            # feature-extraction batch


def _fashion_mnist(c) -> None:
    c.dataset.name = "fashion_mnist"   # IDX .gz files (Debian package dataset-fashion-mnist)
    c.dataset.data_dir = "/usr/share/datasets/fashion-mnist"  # where the Debian package puts them
    _small_grayscale_augment(c, crop_size=28, flip_prob=0.5)
    c.augment.crop_scale = (0.2, 1.0)  # 28x28 leaves room for stronger crops than digits
    c.augment.mean = (0.286,)          # Fashion-MNIST pixel mean
    c.augment.std = (0.353,)           # Fashion-MNIST pixel std
    c.model.name = "cnn_small"
    c.model.widths = (32, 64, 128, 128)
    c.model.stem_stride = 2            # stride 1 at 28x28 is 10x slower on CPU (measured)
    c.eval.batch_size = 1024


def _cifar(c, name: str, mean, std) -> None:
    c.dataset.name = name              # TFDS array_record; build once with `tfds build`
    a = c.augment
    a.crop_size = 32                   # CIFAR images are 32x32
    a.crop_scale = (0.08, 1.0)         # Inception crop as for ImageNet (SimCLR app. B.9)
    a.jitter_strength = 0.5            # SimCLR app. B.9: colour strength 0.5 on CIFAR
    a.blur_prob = (0.0, 0.0)           # SimCLR app. B.9: Gaussian blur left out on CIFAR
    a.solarize_prob = (0.0, 0.0)
    a.mean, a.std = mean, std
    c.model.name = "resnet18"          # SimCLR official README CIFAR-10 example: resnet_depth=18
    c.model.cifar_stem = True          # 3x3 stride-1 stem, no max-pool (SimCLR app. B.9)


def _cifar10(c) -> None:
    _cifar(c, "cifar10", CIFAR10_MEAN, CIFAR10_STD)


def _cifar100(c) -> None:
    _cifar(c, "cifar100", CIFAR100_MEAN, CIFAR100_STD)


def _imagenet(c) -> None:
    c.dataset.name = "imagenet2012"    # TFDS array_record (manual download + `tfds build`)
    c.dataset.image_size = 256         # host decodes and resizes/crops to 256 before device crops
    c.dataset.test_split = "validation"  # ImageNet's labelled evaluation split
    a = c.augment
    a.crop_size = 224                  # SimCLR/BYOL training crop
    a.crop_scale = (0.08, 1.0)         # SimCLR app. A
    a.jitter_strength = 1.0            # SimCLR app. A
    a.blur_prob = (1.0, 0.1)           # BYOL table 6
    a.solarize_prob = (0.0, 0.2)       # BYOL table 6
    a.mean, a.std = IMAGENET_MEAN, IMAGENET_STD
    c.model.name = "resnet50"          # the papers' standard encoder
    c.model.dtype = "bfloat16"         # bf16 compute, float32 parameters
    c.eval.batch_size = 1024


def apply_cpu_recipe(c, preset: str) -> None:
    """The training recipe shared by every method on the CPU-sized presets.

    Measured on 2 CPU cores: AdamW 2e-3 at batch 256 trains the
    4-layer CNN on digits in about a minute (60 epochs = 300 steps); Fashion-MNIST
    needs ~10 epochs to beat raw pixels. Methods set only projector and loss.
    """
    if preset not in CPU_PRESETS:
        raise ValueError(f"apply_cpu_recipe is for digits and fashion_mnist, not {preset!r}.")
    digits = preset == "digits"
    c.batch_size = 256                 # the measured digits/Fashion-MNIST CPU runs
    c.num_epochs = 60.0 if digits else 10.0  # ~1 min on digits; ~10 min on Fashion-MNIST (2 CPU cores)
    c.optimizer.name = "adamw"         # AdamW works at this scale without LARS (measured)
    c.optimizer.lr = 2e-3              # measured on digits: ~0.99 linear after 60 s
    c.optimizer.weight_decay = 1e-4    # light decoupled decay
    c.optimizer.warmup_epochs = 5.0 if digits else 1.0  # short linear warmup, then cosine
    c.probe.lr = 1e-2 if digits else 1e-3  # the digits probe sees only ~300 steps
    c.checkpoint.every_steps = 100 if digits else 500


def build_config(method: Optional[str], arg, recipes: Optional[dict] = None, common=None):
    """The ``get_config(arg)`` body shared by ``configs/<method>.py``.

    ``arg`` is ``PRESET[,encoder=NAME]`` (:func:`parse_config_arg`).
    ``recipes`` maps presets to the method's recipe functions; a preset the
    method has no recipe for gets :func:`apply_cpu_recipe` on the CPU-sized
    presets and the base config's values elsewhere. ``common`` (optional)
    sets values the method uses on every preset, before the recipe.
    ``method=None`` (``configs/default.py``) takes the method from the
    argument's ``method=NAME`` option, so a registered method runs without a
    config file of its own.
    """
    from clrjax import config as config_lib  # local: clrjax.config imports nothing from here

    preset, options = parse_config_arg(arg)
    if method is None:
        if "method" not in options:
            raise ValueError("configs/default.py needs the method in its argument: PRESET,method=NAME, "
                             "e.g. --config=configs/default.py:digits,method=supcon.")
        method = options["method"]
    elif "method" in options:
        raise ValueError(f"this config file trains {method}; for another method use its own config file "
                         f"or configs/default.py:{preset},method={options['method']}.")
    c = config_lib.base_config()
    c.method = method
    apply_dataset_preset(c, preset)
    if common is not None:
        common(c)
    recipe = (recipes or {}).get(preset)
    if recipe is not None:
        recipe(c)
    elif preset in CPU_PRESETS:
        apply_cpu_recipe(c, preset)
    if "encoder" in options:
        switch_encoder(c, options["encoder"])
    fill_model_defaults(c)
    return c
