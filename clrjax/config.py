"""The experiment configuration: every field, its default, and its validation.

Configs are ``ml_collections.ConfigDict`` built by ``configs/<method>.py``
``get_config(arg)`` on top of :func:`base_config`, which documents every field
in one place. :func:`validate_config` runs before anything is compiled or
loaded and raises :class:`ConfigError` with one sentence naming the field and
the fix.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import os
from typing import Any, Mapping, Optional

import ml_collections

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALING_RULES = ("none", "linear", "sqrt")
NONFINITE_POLICIES = ("stop", "skip")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def base_config() -> ml_collections.ConfigDict:
    """All fields with their defaults. Method configs override what they need."""
    c = ml_collections.ConfigDict()
    c.method = "simclr"              # a registered method (clrjax.methods) or the module path of one
    c.loss = ml_collections.ConfigDict()  # keyword arguments of the method's loss (see clrjax.losses)
    c.seed = 0                       # seeds initialisation, data order and augmentations
    c.batch_size = 256               # global batch (images per step, each seen as 2 views)
    c.num_epochs = 100.0             # training length in epochs (used when num_steps == 0)
    c.num_steps = 0                  # training length in steps; overrides num_epochs when > 0
    c.log_every_steps = 20           # console line, metrics.jsonl and TensorBoard every N steps

    c.dataset = ml_collections.ConfigDict()  # which images, from where
    c.dataset.name = "digits"        # a registered dataset (clrjax.data.datasets)
    c.dataset.data_dir = ""          # IDX dir (fashion_mnist) or TFDS data_dir; "" = default
    c.dataset.train_split = "train"  # split used for pretraining and probe training
    c.dataset.test_split = "test"    # split used for evaluation
    c.dataset.image_size = 0         # host-side fixed size for variable-size images / synthetic; 0 = native
    c.dataset.num_examples = 0       # synthetic only: examples per split
    c.dataset.channels = 3           # image channels: synthetic; image_folder/csv/tsv convert to 1 (L) or 3 (RGB)
    c.dataset.path = ""              # image_folder root / csv|tsv list file; "{split}" in it = the split name
    c.dataset.split_fraction = 0.0   # image_folder/csv/tsv without split folders/files: test fraction per class (seed 0)
    c.dataset.class_names = ()       # image_folder/csv/tsv label order; () = sorted names (the CLI records them)
    c.dataset.on_error = "fail"      # bad image/path/class: fail (DataError naming the file) | skip (and count)
    c.dataset.decode_workers = 8     # image_folder/csv/tsv: Pillow decode threads per process
    c.dataset.decode_processes = 0   # image_folder/csv/tsv/webdataset: decode worker processes per process; 0 = threads
    c.dataset.shuffle_buffer = 4096  # webdataset: examples of a process's stream shuffled together (one block)
    c.dataset.host_crop = "center"   # image_folder/csv/tsv/webdataset training split: host square crop center | random

    c.augment = ml_collections.ConfigDict()  # on-device augmentation of the two views
    c.augment.crop_size = 32         # output side of the random resized crop (pixels; 224 for ImageNet)
    c.augment.crop_scale = (0.08, 1.0)  # crop area range as a fraction of the image (SimCLR app. A)
    c.augment.crop_ratio = (3 / 4, 4 / 3)  # crop aspect-ratio range (SimCLR app. A)
    c.augment.flip_prob = 0.5        # horizontal flip probability
    c.augment.jitter_strength = 1.0  # colour jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s)
    c.augment.jitter_prob = 0.8      # probability of applying colour jitter (SimCLR app. A)
    c.augment.gray_prob = 0.2        # probability of grayscale (SimCLR app. A)
    c.augment.blur_prob = (1.0, 0.1)  # Gaussian blur probability per view (BYOL table 6; SimCLR app. A: 0.5 both)
    c.augment.blur_sigma = (0.1, 2.0)  # blur sigma range (SimCLR app. A)
    c.augment.solarize_prob = (0.0, 0.2)  # solarisation probability per view (BYOL table 6; SimCLR has none)
    c.augment.solarize_threshold = 0.5  # pixels >= this (in [0, 1]) become 1 - x (BYOL)
    c.augment.mean = (0.5, 0.5, 0.5)  # per-channel normalisation mean (after augmentation)
    c.augment.std = (0.25, 0.25, 0.25)  # per-channel normalisation std

    c.model = ml_collections.ConfigDict()  # encoder: name, dtype, and the model's own keyword arguments
    c.model.name = "cnn_small"       # encoder: cnn_small, resnet18/34/50, vit_tiny/small/base (switch with :PRESET,encoder=NAME)
    c.model.dtype = "float32"        # compute dtype ("bfloat16" keeps float32 parameters)

    c.projector = ml_collections.ConfigDict()  # projector MLP between encoder features and the loss
    c.projector.hidden_dims = (512,)  # hidden layer widths of the projector MLP
    c.projector.out_dim = 128        # embedding dimension d the loss sees
    c.projector.use_bn = True        # BatchNorm after each hidden layer
    c.projector.last_bn = False      # affine-free BatchNorm on the output (SimCLR v2, Barlow Twins)

    c.predictor = ml_collections.ConfigDict()  # predictor MLP after the projector (BYOL, MoCo v3; unused by others)
    c.predictor.hidden_dims = (512,)  # hidden layer widths of the predictor; its output is projector.out_dim
    c.predictor.use_bn = True        # BatchNorm after each hidden layer of the predictor

    c.momentum = ml_collections.ConfigDict()  # EMA target network of momentum methods (BYOL, MoCo; unused by others)
    c.momentum.base = 0.996          # target momentum tau at the first step, in [0, 1) (BYOL sec. 3.2)
    c.momentum.final = 1.0           # tau at the end of the cosine schedule, in [base, 1]; = base for a constant tau

    c.queue = ml_collections.ConfigDict()  # memory queue of past keys (MoCo v2; unused by others)
    c.queue.size = 65536             # K keys, a multiple of batch_size (MoCo: K = 65,536 on ImageNet)

    c.optimizer = ml_collections.ConfigDict()  # optimizer and learning-rate schedule of encoder + projector
    c.optimizer.name = "adamw"       # one of OPTIMIZERS
    c.optimizer.lr = 1e-3            # base learning rate, before lr_scaling
    c.optimizer.lr_scaling = "none"  # none | linear (lr*B/base_batch) | sqrt (lr*sqrt(B))
    c.optimizer.base_batch = 256     # reference batch of the linear rule
    c.optimizer.weight_decay = 1e-6  # decoupled (adamw) or L2 (sgd, lars) weight decay; skips biases and norms
    c.optimizer.momentum = 0.9       # momentum for sgd and lars
    c.optimizer.nesterov = False     # Nesterov momentum for sgd and lars
    c.optimizer.trust_coefficient = 0.001  # LARS trust coefficient eta
    c.optimizer.b1 = 0.9             # adamw beta1
    c.optimizer.b2 = 0.999           # adamw beta2
    c.optimizer.warmup_epochs = 10.0  # linear warmup length, then cosine decay
    c.optimizer.end_lr = 0.0         # learning rate at the end of the cosine decay
    c.optimizer.grad_clip_norm = 0.0  # global-norm gradient clipping; 0 = off

    c.probe = ml_collections.ConfigDict()  # online linear probe on stop-gradient features (its own optimizer)
    c.probe.lr = 1e-3                # online linear probe's Adam learning rate (own optimizer)
    c.probe.weight_decay = 0.0       # online probe's decoupled weight decay

    c.checkpoint = ml_collections.ConfigDict()  # Orbax checkpoints in <workdir>/checkpoints
    c.checkpoint.every_steps = 500   # save every N steps (and always at the end)
    c.checkpoint.keep = 3            # how many recent checkpoints to keep
    c.checkpoint.async_save = True   # write checkpoints in the background while training continues

    c.eval = ml_collections.ConfigDict()  # evaluation of the frozen encoder
    c.eval.final = True              # after training: linear probe + kNN of the frozen encoder
    c.eval.compare_random_init = True  # also evaluate the same encoder at initialisation
    c.eval.knn_k = (20, 200)         # k values of the weighted kNN (Wu et al. 2018)
    c.eval.knn_temperature = 0.07    # kNN weight temperature (Wu et al. 2018)
    c.eval.batch_size = 512          # feature-extraction batch size
    c.eval.max_train_examples = 0    # cap probe training set size (0 = whole split)

    c.evals = _periodic_evals_config()  # evaluators run during training (clrjax/evaluation/periodic.py)

    c.nonfinite = ml_collections.ConfigDict()  # what a NaN/Inf loss or gradient does
    c.nonfinite.policy = "stop"      # stop: stop at the first non-finite step; skip: drop that update
    c.nonfinite.max_consecutive_skips = 10  # with policy=skip, stop after this many skips in a row
    return c


def _periodic_evals_config() -> ml_collections.ConfigDict:
    """``evals.<name>.every_steps`` (0 = off) and the options of every registered evaluator."""
    from clrjax.evaluation.periodic import EVALUATORS  # the evaluator registry owns the options

    evals = ml_collections.ConfigDict()
    for name in EVALUATORS.names():
        evals[name] = ml_collections.ConfigDict(dict(every_steps=0, **EVALUATORS.get(name).options))
    return evals


# --------------------------------------------------------------------------- validation


def _fail(field: str, problem: str, fix: str) -> None:
    raise ConfigError(f"config.{field} {problem}; {fix}.")


def _suggest(value: str, options) -> str:
    close = difflib.get_close_matches(str(value), list(options), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"use one of {', '.join(map(str, options))}{hint}"


def check_known_keys(config: Mapping, reference: Mapping, prefix: str = "") -> None:
    """Raises on any key of ``config`` absent from ``reference`` (recursing into dicts).

    ``loss`` and ``model`` are open: their keys are checked against the chosen
    loss function's and model's signatures instead.
    """
    config, reference = _plain(config), _plain(reference)
    for key, value in config.items():
        field = f"{prefix}{key}"
        if key not in reference:
            _fail(field, "is not a known field", _suggest(key, reference.keys()))
        if field in ("loss", "model"):
            continue
        if isinstance(value, Mapping) and isinstance(reference[key], Mapping):
            check_known_keys(value, reference[key], prefix=f"{field}.")


def _plain(tree):
    """A ConfigDict as a plain dict (ConfigDict is not a ``Mapping``), anything else as is."""
    return tree.to_dict() if hasattr(tree, "to_dict") else tree


def _check_choice(field: str, value: Any, options) -> None:
    if value not in options:
        _fail(field, f"is {value!r}, which is not supported", _suggest(value, options))


def _check_positive(field: str, value: Any, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = "non-negative" if allow_zero else "positive"
        _fail(field, f"is {value!r} but must be a {bound} number", f"set --config.{field} to a {bound} value")


def _check_probability(field: str, value: Any) -> None:
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            _fail(field, f"is {value!r} but probabilities must lie in [0, 1]",
                  f"set --config.{field} to values between 0 and 1")


def _check_loss_kwargs(config, method) -> None:
    accepted = set(method.loss_kwarg_defaults())
    for key in config.loss:
        if key not in accepted:
            _fail(f"loss.{key}", f"is not an argument of the {config.method} loss",
                  _suggest(key, sorted(accepted)))
    temperature = config.loss.get("temperature", None)
    if temperature is not None:
        _check_positive("loss.temperature", temperature)


def validate_config(config, *, num_devices: Optional[int] = None,
                    num_processes: int = 1) -> None:
    """Checks ``config`` before any data is loaded or anything compiled.

    Args:
      config: the resolved ConfigDict.
      num_devices: global device count the batch will be sharded over.
      num_processes: number of JAX processes feeding the batch.
    Raises:
      ConfigError: naming the offending field and how to fix it.
    """
    check_known_keys(config, base_config())
    method = _registered("method", config.method, "clrjax.methods", "METHODS")
    dataset = _registered("dataset.name", config.dataset.name, "clrjax.data.datasets", "DATASETS")
    _check_splits(config, dataset)
    _check_file_dataset(config)
    _check_choice("optimizer.name", config.optimizer.name, OPTIMIZERS)
    _check_choice("optimizer.lr_scaling", config.optimizer.lr_scaling, LR_SCALING_RULES)
    _check_choice("nonfinite.policy", config.nonfinite.policy, NONFINITE_POLICIES)
    _check_loss_kwargs(config, method)
    _check_views(config, method)
    _check_evals(config)

    if not isinstance(config.batch_size, int) or config.batch_size <= 0:
        _fail("batch_size", f"is {config.batch_size!r} but must be a positive integer",
              "set --config.batch_size to e.g. 256")
    _check_positive("optimizer.lr", config.optimizer.lr)
    _check_positive("probe.lr", config.probe.lr)
    _check_positive("optimizer.weight_decay", config.optimizer.weight_decay, allow_zero=True)
    _check_positive("optimizer.warmup_epochs", config.optimizer.warmup_epochs, allow_zero=True)
    _check_positive("num_epochs", config.num_epochs, allow_zero=True)
    _check_positive("num_steps", config.num_steps, allow_zero=True)
    if config.num_steps == 0 and config.num_epochs == 0:
        _fail("num_steps", "and config.num_epochs are both 0, so there is nothing to train",
              "set --config.num_steps or --config.num_epochs to a positive value")
    _check_positive("log_every_steps", config.log_every_steps)
    _check_positive("checkpoint.every_steps", config.checkpoint.every_steps)
    _check_positive("checkpoint.keep", config.checkpoint.keep)
    _check_positive("eval.batch_size", config.eval.batch_size)
    _check_positive("augment.crop_size", config.augment.crop_size)
    for field in ("flip_prob", "jitter_prob", "gray_prob", "blur_prob", "solarize_prob"):
        _check_probability(f"augment.{field}", config.augment[field])
    scale = tuple(config.augment.crop_scale)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        _fail("augment.crop_scale", f"is {scale!r} but must be (min, max) with 0 < min <= max <= 1",
              "set e.g. --config.augment.crop_scale='(0.08, 1.0)'")
    if config.projector.out_dim <= 0:
        _fail("projector.out_dim", f"is {config.projector.out_dim!r} but must be positive",
              "set --config.projector.out_dim to e.g. 128")

    if num_devices is not None and config.batch_size % num_devices:
        _fail("batch_size", f"is {config.batch_size}, which {num_devices} devices do not divide",
              f"use a multiple of {num_devices}, e.g. {num_devices * max(1, config.batch_size // num_devices)}")
    if config.batch_size % num_processes:
        _fail("batch_size", f"is {config.batch_size}, which {num_processes} processes do not divide",
              f"use a multiple of {num_processes}")
    _check_model(config)
    method.validate(config)


def _registered(field: str, name: Any, module: str, registry: str):
    """The entry called ``name`` in ``module.registry``; ConfigError listing the known names."""
    from clrjax.registry import UnknownNameError

    try:
        return getattr(importlib.import_module(module), registry).get(name)
    except UnknownNameError as err:
        _fail(field, f"is {name!r}, which is not supported", err.fix)


def _check_views(config, method) -> None:
    """Per-view augmentation settings must cover every view the method asks for."""
    for field in ("blur_prob", "solarize_prob"):
        values = tuple(config.augment[field])
        if len(values) < method.num_views:
            _fail(f"augment.{field}", f"has {len(values)} values but {config.method} uses {method.num_views} "
                  "views", f"give one probability per view, e.g. --config.augment.{field}='{(0.5,) * method.num_views}'")


def _check_splits(config, dataset) -> None:
    for field in ("train_split", "test_split"):
        split = config.dataset[field]
        if dataset.splits and split not in dataset.splits:
            quoted = [repr(s) for s in dataset.splits]
            names = " and ".join([", ".join(quoted[:-1]), quoted[-1]] if len(quoted) > 1 else quoted)
            _fail(f"dataset.{field}", f"is {split!r}, which {dataset.name} does not have",
                  f"its splits are {names}")


# datasets read from config.dataset.path (clrjax/data/folders.py, clrjax/data/webdataset.py)
FILE_DATASETS = ("image_folder", "csv", "tsv", "webdataset")


def _check_file_dataset(config) -> None:
    """The config.dataset fields of the datasets read from your own files; checked for every dataset."""
    d = config.dataset
    _check_choice("dataset.on_error", d.on_error, ("fail", "skip"))
    workers = d.decode_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers <= 0:
        _fail("dataset.decode_workers", f"is {workers!r} but must be a positive integer",
              "set --config.dataset.decode_workers to e.g. 8")
    processes = d.decode_processes
    if isinstance(processes, bool) or not isinstance(processes, int) or not 0 <= processes <= 1024:
        _fail("dataset.decode_processes", f"is {processes!r} but must be a whole number >= 0 (at most 1024)",
              "set --config.dataset.decode_processes to e.g. 8 (0 = decode in threads)")
    buffer = d.shuffle_buffer
    if isinstance(buffer, bool) or not isinstance(buffer, int) or not 1 <= buffer <= 2**20:
        _fail("dataset.shuffle_buffer", f"is {buffer!r} but must be a positive integer (at most 2**20: the buffer "
              "holds that many encoded images in memory)", "set --config.dataset.shuffle_buffer to e.g. 4096")
    _check_choice("dataset.host_crop", d.host_crop, ("center", "random"))
    fraction = d.split_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        _fail("dataset.split_fraction", f"is {fraction!r} but must be in [0, 1)",
              "set --config.dataset.split_fraction to the test fraction, e.g. 0.1 (0 = no split)")
    if d.name not in FILE_DATASETS:
        return
    if d.channels not in (1, 3):
        _fail("dataset.channels", f"is {d.channels!r} but {d.name} converts images to 1 or 3 channels",
              "set --config.dataset.channels=1 (grayscale) or 3 (RGB)")
    if not isinstance(d.image_size, int) or d.image_size < 0:
        _fail("dataset.image_size", f"is {d.image_size!r} but must be a whole number >= 0",
              "set --config.dataset.image_size to the decoded side, e.g. 224 (0 = native size)")
    if not d.path:
        what = {"image_folder": "the image folder", "webdataset": "the tar shards (e.g. shards-{00000..00099}.tar)"}
        _fail("dataset.path", f"is empty but {d.name} reads its images from it",
              f"set --config.dataset.path to {what.get(d.name, f'the {d.name} list file')}")
    path = os.path.expanduser(d.path)
    if d.name == "webdataset":
        from clrjax.data.webdataset import expand_shards  # local: config imports no data module at import time

        if "{split}" not in path and not any(os.path.exists(p) for p in expand_shards(path)):
            _fail("dataset.path", f"is {d.path!r}, which names no existing tar shard",
                  "set --config.dataset.path to the shards: a path, a {00000..00099} pattern, a glob or a directory")
        return
    if "{split}" not in path and not os.path.exists(path):
        _fail("dataset.path", f"is {d.path!r}, which does not exist", f"set --config.dataset.path to {d.name}'s "
              "folder or list file")
    if len(set(d.class_names)) != len(d.class_names):
        _fail("dataset.class_names", f"lists a class twice ({tuple(d.class_names)!r})", "give each class once")


def _check_evals(config) -> None:
    for name, evaluator_cfg in config.evals.items():
        every = evaluator_cfg.get("every_steps", None)
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            _fail(f"evals.{name}.every_steps", f"is {every!r} but must be a whole number >= 0",
                  f"set --config.evals.{name}.every_steps to 0 (off) or an interval in steps")


def _check_model(config) -> None:
    from clrjax import models  # local: the registry validates names and keyword arguments

    try:
        models.build_encoder(config.model)
    except models.UnknownModelFieldError as err:
        # Usually --config.model.name changed on a preset that set another encoder's fields.
        raise ConfigError(
            f"config.model is invalid: {err} To change a preset's encoder, name it in the config "
            "argument instead of --config.model.name, e.g. --config=configs/simclr.py:fashion_mnist,encoder=resnet18 "
            "(that encoder at its defaults)."
        ) from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"config.model is invalid: {err}") from None
    try:
        models.check_input_size(config.model.to_dict(), config.augment.crop_size)
    except ValueError as err:
        raise ConfigError(f"config.augment.crop_size is {config.augment.crop_size}: {err}") from None


def loss_kwargs(config) -> dict:
    """The method's loss keyword arguments from ``config.loss`` as plain Python values."""
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.loss.to_dict().items()}


def fill_loss_defaults(config) -> None:
    """Adds every keyword of the method's loss, at its default, to ``config.loss``.

    A config then lists the whole loss API, and each keyword can be overridden
    from the command line (``--config.loss.chunk_size=4096``), which
    ml_collections only allows for fields that exist.
    """
    from clrjax import methods

    for name, default in methods.get(config.method).loss_kwarg_defaults().items():
        if name not in config.loss:
            # A bare None field cannot be overridden from the command line; a typed
            # placeholder can (the only None default, SimCLR's chunk_size, is an int).
            config.loss[name] = ml_collections.config_dict.placeholder(int) if default is None else default


# --------------------------------------------------------------------------- loading


# Fields renamed since a run's config.json may have been written: old dotted name -> new.
RENAMED_FIELDS = {"eval.knn_every_steps": "evals.knn.every_steps"}


def upgrade_saved_config(saved: Mapping) -> ml_collections.ConfigDict:
    """A run's saved config.json as a config of this version of clrjax.

    Fields added since it was written get their ``base_config`` defaults (what
    the older run computed with); renamed fields (:data:`RENAMED_FIELDS`) move
    to their new names. The open ``loss`` and ``model`` sections are kept as saved.
    """
    upgraded = _with_defaults(dict(saved), base_config().to_dict())
    for old, new in RENAMED_FIELDS.items():
        *old_parents, old_leaf = old.split(".")
        node = upgraded
        for name in old_parents:
            node = node.get(name, {})
        if old_leaf in node:
            value = node.pop(old_leaf)
            *new_parents, new_leaf = new.split(".")
            target = upgraded
            for name in new_parents:
                target = target.setdefault(name, {})
            target[new_leaf] = value
    return ml_collections.ConfigDict(upgraded)


def _with_defaults(saved: dict, defaults: dict) -> dict:
    merged = dict(saved)
    for key, default in defaults.items():
        if key not in merged:
            merged[key] = default
        elif isinstance(default, dict) and isinstance(merged[key], dict) and key not in ("loss", "model"):
            merged[key] = _with_defaults(merged[key], default)
    return merged


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``'configs/simclr.py:digits'`` -> the ConfigDict, as ``--config=`` would build it."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"the config file {path!r} does not exist; pass e.g. configs/simclr.py:digits.")
    module_spec = importlib.util.spec_from_file_location(f"clrjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Returns a copy of ``config`` with dotted-key overrides, e.g. {'optimizer.lr': 0.3}.

    An unknown key fails with the field's name, as on the command line.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for i, name in enumerate(parents):
            if name not in node:
                _fail(".".join(parents[: i + 1]), "is not a known field", "check the spelling")
            node = node[name]
        if leaf not in node and ".".join(parents) not in ("loss", "model"):
            _fail(dotted, "is not a known field", _suggest(leaf, node.keys()))
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config
