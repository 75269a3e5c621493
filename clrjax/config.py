"""The experiment configuration: every field, its default, and its validation.

Configs are ``ml_collections.ConfigDict`` built by ``configs/<method>.py``
``get_config(arg)`` on top of :func:`base_config`, which documents every field
in one place, and :data:`FIELD_SPECS` gives every field's type and range
(``LOSS_SPECS`` those of the losses' keywords). :func:`validate_config` runs
before anything is compiled or loaded and raises :class:`ConfigError` with one
sentence naming the field and the fix. A new field needs a FIELD_SPECS entry
(tests/test_config_fuzz.py checks that the table covers base_config).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import numbers
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
    c.micro_batch_size = 0           # gradient caching: examples of the global batch per micro-step; 0 = off
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
    c.dataset.caption_column = ""    # image-text data: csv/tsv caption column, webdataset 'txt'; "" = no captions

    c.text = ml_collections.ConfigDict()  # captions -> token ids, on the host (clrjax/data/tokenizers.py)
    c.text.tokenizer = "bytes"       # bytes (UTF-8 + pad/sot/eot, no file) | sentencepiece | bpe (text.vocab_file)
    c.text.vocab_file = ""           # sentencepiece: the trained .model file; bpe: a tokenizers tokenizer.json
    c.text.context_length = 77       # tokens per caption incl. sot and eot (CLIP 77, SigLIP 64)

    c.image_tower = ml_collections.ConfigDict()  # image-text methods (clip, siglip): the image side; unused by others
    c.image_tower.init_from = ""     # run directory or export whose encoder starts the image tower; "" = random init
    c.image_tower.locked = False     # LiT (Zhai et al. 2022): image encoder frozen, BatchNorm in inference mode
    c.image_tower.projection = True  # linear map of the features to projector.out_dim; False: features are the embedding
    c.text_tower = ml_collections.ConfigDict()  # image-text methods: the text Transformer (clrjax/models/text.py)
    c.text_tower.preset = "tiny"     # TEXT_PRESETS name: tiny | clip_b | clip_l | siglip_b (ids from config.text)

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
    # the 2 views become global crops of crop_size px, plus num_local local crops; 0 = off (unchanged)
    c.augment.multicrop = ml_collections.ConfigDict()  # multi-crop (SwAV sec. 3.2; clrjax/methods/multicrop.py)
    c.augment.multicrop.num_local = 0  # V local crops per image (SwAV ImageNet: 6; 0 = no multi-crop)
    c.augment.multicrop.local_size = 96  # local crop side in pixels (SwAV: 96)
    c.augment.multicrop.local_scale = (0.05, 0.14)  # local crop area fraction (SwAV)
    c.augment.multicrop.global_scale = (0.14, 1.0)  # global crop area fraction (SwAV; replaces crop_scale)
    c.augment.multicrop.local_blur_prob = 0.5  # blur probability of a local crop (SwAV, DINO: 0.5)
    c.augment.multicrop.local_solarize_prob = 0.0  # solarisation probability of a local crop (SwAV, DINO: 0)

    c.model = ml_collections.ConfigDict()  # encoder: name, dtype, and the model's own keyword arguments
    c.model.name = "cnn_small"       # encoder: cnn_small, resnet18/34/50, vit_tiny/small/base/large (switch with :PRESET,encoder=NAME)
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
    c.optimizer.freeze = ()          # parameter paths never updated, e.g. ('encoder/patch_embed',) (MoCo v3 ViT)

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

    c.sharding = ml_collections.ConfigDict()  # where the train state lives on the mesh (clrjax/state_sharding.py)
    c.sharding.mode = "replicated"   # replicated: the whole state on every device | fsdp: large arrays split over them
    c.sharding.min_size = 2**16      # fsdp: arrays with fewer elements than this stay replicated
    c.profile_steps = ()             # (a, b): JAX profiler trace of steps a+1..b into <workdir>/profile; () = off
    return c


def _periodic_evals_config() -> ml_collections.ConfigDict:
    """``evals.<name>.every_steps`` (0 = off) and the options of every registered evaluator."""
    from clrjax.evaluation.periodic import EVALUATORS  # the evaluator registry owns the options

    evals = ml_collections.ConfigDict()
    for name in EVALUATORS.names():
        evals[name] = ml_collections.ConfigDict(dict(every_steps=0, **EVALUATORS.get(name).options))
    return evals


# --------------------------------------------------------------------------- field ranges

# Upper bounds of the counts and sizes (docs/BAD_INPUT.md, "Field ranges"). They are sanity bounds,
# far beyond any published setting, so that a typo (an exponent too many) fails here instead of
# overflowing a counter or exhausting memory after compilation.
MAX_COUNT = 2**31 - 1   # steps, intervals, example counts: the step counter and example indices are int32
MAX_BATCH = 2**24       # images per step (the largest published contrastive batches are 32k-64k)
MAX_WIDTH = 2**16       # MLP widths, the embedding dimension, the encoder's sizes (VICReg's expander: 8192)
MAX_LAYERS = 64         # hidden layers of the projector and predictor MLPs
MAX_SIDE = 4096         # image sides in pixels (ImageNet trains at 224)
MAX_EPOCHS = 10**6      # training and warmup length in epochs
MAX_SEED = 2**32 - 1
MAX_WORKERS = 1024      # decode threads per process
MAX_SEEDS = 1000        # draws of the few-shot evaluator
FLOAT32_MAX = 3.4028234663852886e38  # numbers reach the device as float32


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_sequence(v) -> bool:
    return isinstance(v, (tuple, list))


def _num(x) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    """The values one config field accepts (its type and range).

    ``problem(value)`` is None for an accepted value, else what is wrong
    ("must be a positive integer"); ``fix`` is what the message tells the user
    to set instead ("" = derived from the range).
    """
    fix: Any = ""    # or ``config -> str`` when the fix depends on other fields

    def problem(self, value) -> Optional[str]:
        raise NotImplementedError

    def default_fix(self) -> str:
        return "a valid value"

    def summary(self) -> str:
        """What the field accepts, for docs/BAD_INPUT.md."""
        return self.default_fix()

    def fix_for(self, config) -> str:
        return (self.fix(config) if callable(self.fix) else self.fix) or self.default_fix()

    def check(self, field: str, value, config=None) -> None:
        problem = self.problem(value)
        if problem is not None:
            _fail(field, f"is {_show(value)} but {problem}", f"set --config.{field} to {self.fix_for(config)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int(Spec):
    """A whole number (not a bool) in [lo, cap]; ``choices`` lists the only values allowed."""
    lo: int = 0
    cap: int = MAX_COUNT
    why: str = ""            # why the cap, said when it is exceeded
    choices: tuple = ()
    optional: bool = False   # None allowed (e.g. loss.chunk_size: None = off)

    def describe(self) -> str:
        if self.choices:
            return " or ".join(map(str, self.choices))
        text = "a positive integer" if self.lo == 1 else f"a whole number >= {self.lo}"
        return text + (" or None" if self.optional else "")

    def problem(self, value):
        if value is None and self.optional:
            return None
        if self.choices:
            return None if _is_int(value) and value in self.choices else f"must be {self.describe()}"
        if not _is_int(value) or value < self.lo:
            return f"must be {self.describe()}"
        if value > self.cap:
            return f"must be at most {self.cap}" + (f", {self.why}" if self.why else "")
        return None

    def default_fix(self) -> str:
        return self.describe()

    def summary(self) -> str:
        if self.choices:
            return self.describe()
        return f"integer in [{self.lo}, {self.cap}]" + (", or None" if self.optional else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Num(Spec):
    """A finite number (int or float, not a bool) in the interval ``lo..hi``, at most ``cap``."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    cap: float = math.inf    # a sanity bound, named only when exceeded
    why: str = ""

    def describe(self) -> str:
        if math.isinf(self.hi):
            if self.lo == 0:
                return "a positive number" if self.lo_open else "a non-negative number"
            if math.isinf(self.lo):
                return "a finite number"
            return f"a number {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return (f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}"
                f"{')' if self.hi_open else ']'}")

    def accepts(self, value) -> bool:
        return (_is_number(value) and (value > self.lo if self.lo_open else value >= self.lo)
                and (value < self.hi if self.hi_open else value <= self.hi))

    def problem(self, value):
        if not self.accepts(value):
            return f"must be {self.describe()}"
        if isinstance(value, numbers.Integral) and abs(value) > MAX_COUNT:
            return f"must be at most {MAX_COUNT} as an integer (it reaches the device as int32); write it as a float"
        if abs(value) > FLOAT32_MAX:
            return f"must be at most {FLOAT32_MAX:g} in size (it reaches the device as float32)"
        if value > self.cap:
            return f"must be at most {_num(self.cap)}" + (f", {self.why}" if self.why else "")
        return None

    def summary(self) -> str:
        text = self.describe()
        text = text.replace("a ", "", 1) if text.startswith("a ") else f"number {text}"
        return text + (f", at most {_num(self.cap)}" if not math.isinf(self.cap) else "")

    def default_fix(self) -> str:
        if math.isinf(self.hi) and self.lo == 0:
            return "a positive value" if self.lo_open else "a non-negative value"
        return f"a value {self.describe()}" if self.describe().startswith("in ") else self.describe()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Bool(Spec):
    def problem(self, value):
        return None if isinstance(value, bool) else "must be True or False"

    def default_fix(self) -> str:
        return "True or False"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Str(Spec):
    """A string; with ``choices``, one of them (the message suggests the closest)."""
    choices: tuple = ()
    nonempty: bool = False

    def problem(self, value):
        if not isinstance(value, str):
            return "must be a string"
        if self.nonempty and not value:
            return "must not be empty"
        return None

    def check(self, field: str, value, config=None) -> None:
        if self.choices and (not isinstance(value, str) or value not in self.choices):
            _fail(field, f"is {_show(value)}, which is not supported", _suggest(value, self.choices))
        super().check(field, value, config)

    def default_fix(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"

    def summary(self) -> str:
        return f"one of {', '.join(self.choices)}" if self.choices else self.default_fix()[2:]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Seq(Spec):
    """A tuple (or list, as config.json gives it) of ``item`` values, ``min_len..max_len`` long."""
    item: Spec = dataclasses.field(default_factory=Spec)
    what: str = "values"     # the items, plural, for the message ("positive integers")
    min_len: int = 0
    max_len: int = MAX_COUNT
    unique: bool = False

    def problem(self, value):
        if not _is_sequence(value):
            return f"must be a tuple of {self.what}"
        for v in value:
            problem = self.item.problem(v)
            if problem is not None:
                return f"must be a tuple of {self.what} ({v!r} {problem})"
        if len(value) < self.min_len:
            return "must not be empty" if self.min_len == 1 else f"must have at least {self.min_len} values"
        if len(value) > self.max_len:
            return f"must have at most {self.max_len} values"
        if self.unique and len(set(value)) != len(value):
            twice = next(v for i, v in enumerate(value) if v in value[:i])
            return f"lists {twice!r} twice"
        return None

    def default_fix(self) -> str:
        return f"a tuple of {self.what}"

    def summary(self) -> str:
        if self.max_len < MAX_COUNT:
            length = f", {self.min_len} to {self.max_len} of them"
        else:
            length = f", at least {self.min_len}" if self.min_len else ""
        return f"tuple of {self.what} ({self.item.summary()}){length}" + (", no repeats" if self.unique else "")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pair(Spec):
    """A range ``(min, max)`` of finite numbers with lo < (or <=) min <= max <= (or <) hi."""
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = True
    hi_open: bool = False

    def describe(self) -> str:
        text = f"(min, max) with {_num(self.lo)} {'<' if self.lo_open else '<='} min <= max"
        return text if math.isinf(self.hi) else f"{text} {'<' if self.hi_open else '<='} {_num(self.hi)}"

    def problem(self, value):
        bounds = Num(lo=self.lo, hi=self.hi, lo_open=self.lo_open, hi_open=self.hi_open)
        ok = (_is_sequence(value) and len(value) == 2 and all(bounds.accepts(v) for v in value)
              and value[0] <= value[1])
        return None if ok else f"must be {self.describe()}"

    def summary(self) -> str:
        return self.describe()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probability(Spec):
    """A probability, or (``per_view``) a tuple of them, one per view of the method."""
    per_view: bool = False

    def problem(self, value):
        if self.per_view and not _is_sequence(value):
            return "must be a tuple with one probability per view"
        values = value if self.per_view else (value,)
        if self.per_view and not values:
            return "must not be empty"
        if not all(_is_number(v) and 0.0 <= v <= 1.0 for v in values):
            return "probabilities must lie in [0, 1]"
        return None

    def check(self, field: str, value, config=None) -> None:
        problem = self.problem(value)
        if problem is not None:
            _fail(field, f"is {_show(value)} but {problem}", f"set --config.{field} to values between 0 and 1")

    def summary(self) -> str:
        return "tuple of probabilities in [0, 1], one per view" if self.per_view else "probability in [0, 1]"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Like(Spec):
    """The fallback for a field without an entry: the type of its default (None: anything)."""
    default: Any = None

    def problem(self, value):
        d = self.default
        if d is None:
            return None
        if isinstance(d, bool):
            return Bool().problem(value)
        if isinstance(d, int):
            return None if _is_int(value) else "must be a whole number"
        if isinstance(d, float):
            return None if _is_number(value) else "must be a finite number"
        if isinstance(d, str):
            return Str().problem(value)
        if isinstance(d, (tuple, list)):
            return None if _is_sequence(value) else "must be a tuple"
        return None

    def default_fix(self) -> str:
        return f"a value like its default {self.default!r}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepRange(Spec):
    """``()`` (off) or ``(a, b)``: whole numbers with 0 <= a < b, the steps a+1..b of the run."""

    def problem(self, value):
        if _is_sequence(value) and len(value) == 0:
            return None
        if not (_is_sequence(value) and len(value) == 2 and all(_is_int(v) for v in value)
                and 0 <= value[0] < value[1] <= MAX_COUNT):
            return "must be () or (a, b) with whole numbers 0 <= a < b (the steps a+1..b)"
        return None

    def default_fix(self) -> str:
        return "'(10, 15)' (steps 11 to 15) or () for no trace"

    def summary(self) -> str:
        return "() or (a, b), whole numbers with 0 <= a < b"


class _DatasetChannels(Int):
    """1 or 3: the augmentation works on grayscale or RGB images; the message names the dataset."""

    def check(self, field: str, value, config=None) -> None:
        if self.problem(value) is not None:
            name = config.dataset.name if config is not None else ""
            reason = (f"{name} converts images to 1 or 3 channels" if name in FILE_DATASETS
                      else "the augmentation takes 1 (grayscale) or 3 (RGB) channels")
            _fail(field, f"is {_show(value)} but {reason}", f"set --config.{field}=1 (grayscale) or 3 (RGB)")


_POSITIVE = Num(lo=0, lo_open=True)
_NON_NEGATIVE = Num(lo=0)
_UNIT = Num(lo=0, hi=1)
_DECAY = Num(lo=0, hi=1, hi_open=True)
_STEPS = "the step counter is int32"


# Every field of base_config() but the open sections ``loss`` and ``model`` (checked against the
# method's loss and the encoder), in base_config's order. tests/test_config_fuzz.py checks that
# the table covers base_config and that every entry rejects wrong types, zeros, negatives, huge
# and empty values with one line naming the field.
FIELD_SPECS = {
    "method": Str(nonempty=True, fix="a registered method such as simclr"),
    "seed": Int(lo=0, cap=MAX_SEED, why="seeds are 32-bit", fix="a whole number such as 0"),
    "batch_size": Int(lo=1, cap=MAX_BATCH, why="the batch-size bound", fix="a positive integer such as 256"),
    "micro_batch_size": Int(lo=0, cap=MAX_BATCH, why="the batch-size bound",
                            fix="a divisor of batch_size such as batch_size / 4 (0 = no gradient caching)"),
    "num_epochs": Num(lo=0, cap=MAX_EPOCHS, why="the epoch bound", fix="a non-negative value such as 100"),
    "num_steps": Int(lo=0, why=_STEPS, fix="a whole number >= 0 (0 = use num_epochs)"),
    "log_every_steps": Int(lo=1, why=_STEPS, fix="a positive integer such as 20"),
    "dataset.name": Str(nonempty=True, fix="a registered dataset such as digits"),
    "dataset.data_dir": Str(fix="a directory (\"\" = the default)"),
    "dataset.train_split": Str(nonempty=True, fix="a split of the dataset such as train"),
    "dataset.test_split": Str(nonempty=True, fix="a split of the dataset such as test"),
    "dataset.image_size": Int(lo=0, cap=MAX_SIDE, why="the image-side bound",
                              fix="the decoded side such as 224 (0 = native size)"),
    "dataset.num_examples": Int(lo=0, why="example indices are int32", fix="a whole number >= 0 (0 = default)"),
    "dataset.channels": _DatasetChannels(choices=(1, 3)),
    "dataset.path": Str(fix="the image folder or list file"),
    "dataset.split_fraction": Num(lo=0, hi=1, hi_open=True,
                                  fix="the test fraction such as 0.1 (0 = no split)"),
    "dataset.class_names": Seq(item=Str(nonempty=True), what="non-empty class names", unique=True,
                               fix="the class names, each once (() = sorted folder names)"),
    "dataset.on_error": Str(choices=("fail", "skip")),
    "dataset.decode_workers": Int(lo=1, cap=MAX_WORKERS, why="the thread bound", fix="a positive integer such as 8"),
    "dataset.decode_processes": Int(lo=0, cap=MAX_WORKERS, why="the worker bound",
                                    fix="a whole number such as 8 (0 = decode in threads)"),
    "dataset.shuffle_buffer": Int(lo=1, cap=2**20, why="the buffer holds that many encoded images in memory",
                                  fix="a positive integer such as 4096"),
    "dataset.host_crop": Str(choices=("center", "random")),
    "dataset.caption_column": Str(fix="the caption column of the csv/tsv list, or txt for webdataset (\"\" = none)"),
    "text.tokenizer": Str(choices=("bytes", "sentencepiece", "bpe")),
    "text.vocab_file": Str(fix="a SentencePiece .model or tokenizers tokenizer.json file (\"\" for bytes)"),
    "text.context_length": Int(lo=3, cap=MAX_WIDTH, why="the width bound",
                               fix="a whole number >= 3 (sot, a token, eot) such as 77"),
    "image_tower.init_from": Str(fix="a clrjax run directory or export directory (\"\" = random init)"),
    "image_tower.locked": Bool(),
    "image_tower.projection": Bool(),
    "text_tower.preset": Str(choices=("tiny", "clip_b", "clip_l", "siglip_b")),
    "augment.crop_size": Int(lo=1, cap=MAX_SIDE, why="the image-side bound", fix="a positive integer such as 32"),
    "augment.crop_scale": Pair(lo=0, hi=1, fix="'(0.08, 1.0)'"),
    "augment.crop_ratio": Pair(lo=0, fix="'(0.75, 1.3333)'"),
    "augment.flip_prob": Probability(),
    "augment.jitter_strength": Num(lo=0, fix="a non-negative value such as 1.0 (0 = no jitter)"),
    "augment.jitter_prob": Probability(),
    "augment.gray_prob": Probability(),
    "augment.blur_prob": Probability(per_view=True),
    "augment.blur_sigma": Pair(lo=0, fix="'(0.1, 2.0)'"),
    "augment.solarize_prob": Probability(per_view=True),
    "augment.solarize_threshold": _UNIT,
    "augment.mean": Seq(item=_UNIT, what="per-channel means of pixels / 255", min_len=1,
                        fix="the per-channel means of pixels / 255 such as '(0.485, 0.456, 0.406)'"),
    "augment.std": Seq(item=Num(lo=0, hi=1, lo_open=True), min_len=1,
                       what="per-channel stds of pixels / 255",
                       fix="the per-channel stds of pixels / 255 such as '(0.229, 0.224, 0.225)'"),
    "augment.multicrop.num_local": Int(lo=0, cap=64, why="the crop-count bound",
                                       fix="a whole number such as 6 (0 = no multi-crop)"),
    "augment.multicrop.local_size": Int(lo=1, cap=MAX_SIDE, why="the image-side bound",
                                        fix="a positive integer smaller than crop_size such as 96"),
    "augment.multicrop.local_scale": Pair(lo=0, hi=1, fix="'(0.05, 0.14)'"),
    "augment.multicrop.global_scale": Pair(lo=0, hi=1, fix="'(0.14, 1.0)'"),
    "augment.multicrop.local_blur_prob": Probability(),
    "augment.multicrop.local_solarize_prob": Probability(),
    "projector.hidden_dims": Seq(item=Int(lo=1, cap=MAX_WIDTH, why="the MLP-width bound"), max_len=MAX_LAYERS,
                                 what="positive layer widths", fix="layer widths such as '(2048,)'"),
    "projector.out_dim": Int(lo=1, cap=MAX_WIDTH, why="the MLP-width bound", fix="a positive integer such as 128"),
    "projector.use_bn": Bool(),
    "projector.last_bn": Bool(),
    "predictor.hidden_dims": Seq(item=Int(lo=1, cap=MAX_WIDTH, why="the MLP-width bound"), max_len=MAX_LAYERS,
                                 what="positive layer widths", fix="layer widths such as '(4096,)'"),
    "predictor.use_bn": Bool(),
    "momentum.base": Num(lo=0, hi=1, hi_open=True, fix="a value such as 0.996"),
    "momentum.final": Num(lo=0, hi=1, fix="1.0 (cosine schedule to 1) or momentum.base (constant)"),
    "queue.size": Int(lo=1, cap=MAX_BATCH, why="the queue bound",
                      fix=lambda c: f"a positive multiple of {c.batch_size} (config.batch_size) such as "
                                    f"{c.batch_size * max(1, 65536 // c.batch_size)}"),
    "optimizer.name": Str(choices=OPTIMIZERS),
    "optimizer.lr": _POSITIVE,
    "optimizer.lr_scaling": Str(choices=LR_SCALING_RULES),
    "optimizer.base_batch": Int(lo=1, cap=MAX_BATCH, why="the batch-size bound", fix="a positive integer such as 256"),
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.momentum": _DECAY,
    "optimizer.nesterov": Bool(),
    "optimizer.trust_coefficient": Num(lo=0, lo_open=True, fix="a positive value such as 0.001"),
    "optimizer.b1": _DECAY,
    "optimizer.b2": _DECAY,
    "optimizer.warmup_epochs": Num(lo=0, cap=MAX_EPOCHS, why="the epoch bound"),
    "optimizer.end_lr": _NON_NEGATIVE,
    "optimizer.grad_clip_norm": Num(lo=0, fix="a positive value (0 = off)"),
    "optimizer.freeze": Seq(item=Str(nonempty=True), what="'/'-separated parameter paths", unique=True,
                            fix="'(\"encoder/patch_embed\",)' (a ViT's patch embedding) or () (nothing frozen)"),
    "probe.lr": _POSITIVE,
    "probe.weight_decay": _NON_NEGATIVE,
    "checkpoint.every_steps": Int(lo=1, why=_STEPS, fix="a positive integer such as 500"),
    "checkpoint.keep": Int(lo=1, fix="a positive integer such as 3"),
    "checkpoint.async_save": Bool(),
    "eval.final": Bool(),
    "eval.compare_random_init": Bool(),
    "eval.knn_k": Seq(item=Int(lo=1), what="positive integers", min_len=1, fix="'(20, 200)'"),
    "eval.knn_temperature": Num(lo=0, lo_open=True, fix="a positive value such as 0.07"),
    "eval.batch_size": Int(lo=1, cap=MAX_BATCH, why="the batch-size bound", fix="a positive integer such as 512"),
    "eval.max_train_examples": Int(lo=0, why="example indices are int32", fix="a whole number >= 0 (0 = all)"),
    "evals.*.every_steps": Int(lo=0, why=_STEPS, fix="0 (off) or an interval in steps"),
    "evals.knn.k": Seq(item=Int(lo=1), what="positive integers", min_len=1, fix="'(20,)'"),
    "evals.knn.temperature": Num(lo=0, lo_open=True, fix="a positive value such as 0.07"),
    "evals.fewshot.shots": Seq(item=Int(lo=1), what="positive integers", min_len=1, fix="'(10,)'"),
    "evals.fewshot.seeds": Int(lo=1, cap=MAX_SEEDS, why="the draw bound", fix="a positive integer such as 3"),
    "evals.zero_shot.templates": Seq(item=Str(nonempty=True), what="prompt templates, each with one {}", unique=True,
                                     fix="'(\"a photo of a {}.\",)' (() = the test split's own templates)"),
    "nonfinite.policy": Str(choices=NONFINITE_POLICIES),
    "nonfinite.max_consecutive_skips": Int(lo=1, why=_STEPS, fix="a positive integer such as 10"),
    "sharding.mode": Str(choices=("replicated", "fsdp")),
    "sharding.min_size": Int(lo=1, fix="a positive integer such as 65536 (arrays with fewer elements stay replicated)"),
    "profile_steps": StepRange(),
}

# The keyword arguments of the losses (config.loss), by name; a method's other keywords get
# the type of their default (Like).
LOSS_SPECS = {
    "temperature": _POSITIVE,
    "decoupled": Bool(),
    "chunk_size": Int(lo=1, optional=True, fix="a positive integer such as 4096 (unset = one dense block)"),
    "monitors": Bool(),
    "lambd": Num(lo=0, fix="a non-negative value such as 0.0051"),
    "eps": Num(lo=0, lo_open=True, fix="a small positive value such as 1e-05"),
    "impl": Str(choices=("auto", "replicated", "column_split")),
    "sim_coeff": _NON_NEGATIVE,
    "std_coeff": _NON_NEGATIVE,
    "cov_coeff": _NON_NEGATIVE,
    "beta": Num(lo=0, hi=1, hi_open=True, fix="a value such as 0.9"),
    "rho": _NON_NEGATIVE,
    "label_smoothing": Num(lo=0, hi=1, hi_open=True, fix="a value such as 0.1"),
    "siglip.impl": Str(choices=("ppermute", "all_gather")),  # '<method>.<keyword>': that method's own range
}


def field_spec(field: str, default: Any = None) -> Spec:
    """The spec of dotted ``field`` (``evals.<name>.every_steps`` for every evaluator), else its default's type."""
    if field in FIELD_SPECS:
        return FIELD_SPECS[field]
    parts = field.split(".")
    if len(parts) == 3 and parts[0] == "evals" and f"evals.*.{parts[2]}" in FIELD_SPECS:
        return FIELD_SPECS[f"evals.*.{parts[2]}"]
    return Like(default=default)


def _show(value) -> str:
    """``repr`` on one line, shortened: what a message quotes of a bad value."""
    text = repr(_plain(value))
    return text if len(text) <= 120 else text[:100] + " ...(" + str(len(text)) + " characters)"


def check_field_ranges(config) -> None:
    """Checks every field but those of ``loss`` and ``model`` against :data:`FIELD_SPECS` (type and range).

    The config is walked along ``base_config``: a field it lacks, or a section given
    a plain value, fails too (configs build on base_config, which has every field).
    """
    _check_section(_plain(config), base_config().to_dict(), "", config)


def _check_section(values: Mapping, reference: Mapping, prefix: str, config) -> None:
    for key, default in reference.items():
        field = f"{prefix}{key}"
        if key not in values:
            _fail(field, "is missing", "build the config on clrjax.config.base_config(), which has every field")
        value = values[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                _fail(field, f"is {_show(value)} but is a section of fields, not a value",
                      f"set its fields instead (--config.{field}.NAME=VALUE)")
            if field not in ("loss", "model"):  # open sections: the loss's and the encoder's own checks
                _check_section(value, default, f"{field}.", config)
        else:
            field_spec(field, default).check(field, value, config)


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


def _check_loss_kwargs(config, method) -> None:
    """Every key of ``config.loss`` is a keyword of the method's loss, in its range (:data:`LOSS_SPECS`)."""
    defaults = method.loss_kwarg_defaults()
    for key in config.loss:
        if key not in defaults:
            _fail(f"loss.{key}", f"is not an argument of the {config.method} loss",
                  _suggest(key, sorted(defaults)))
        spec = LOSS_SPECS.get(f"{config.method}.{key}") or LOSS_SPECS.get(key, Like(default=defaults[key]))
        spec.check(f"loss.{key}", config.loss[key], config)


def _check_loss_layout(config, num_devices: Optional[int]) -> None:
    """What the losses would otherwise refuse while the first step compiles."""
    if config.loss.get("impl", None) == "column_split" and num_devices and config.projector.out_dim % num_devices:
        _fail("loss.impl", f"is 'column_split', which needs config.projector.out_dim ({config.projector.out_dim}) "
              f"divisible by the {num_devices} devices", "use impl='auto' or 'replicated', or a divisible out_dim")
    if config.batch_size < 2 and (config.method == "vicreg" or config.loss.get("decoupled", False)):
        _fail("batch_size", f"is {config.batch_size} but {config.method} needs at least 2 images per step "
              "(a variance, or a negative per anchor)", "set --config.batch_size to 2 or more")


def validate_config(config, *, num_devices: Optional[int] = None,
                    num_processes: int = 1) -> None:
    """Checks ``config`` before any data is loaded or anything compiled.

    First every field against its range (:data:`FIELD_SPECS`, :data:`LOSS_SPECS`;
    the encoder's fields against the encoder), then what depends on several
    fields, the method, the dataset's split names and the device count.
    Dataset contents (files present, channels, sizes) are checked when
    :func:`clrjax.train.build_experiment` opens the splits, still before
    anything is compiled.

    Args:
      config: the resolved ConfigDict.
      num_devices: global device count the batch will be sharded over.
      num_processes: number of JAX processes feeding the batch.
    Raises:
      ConfigError: one line naming the offending field and how to fix it.
    """
    check_known_keys(config, base_config())
    check_field_ranges(config)
    method = _registered("method", config.method, "clrjax.methods", "METHODS")
    dataset = _registered("dataset.name", config.dataset.name, "clrjax.data.datasets", "DATASETS")
    _check_splits(config, dataset)
    _check_file_dataset(config)
    _check_text(config)
    _check_loss_kwargs(config, method)
    _check_loss_layout(config, num_devices)
    _check_views(config, method)
    if config.num_steps == 0 and config.num_epochs == 0:
        _fail("num_steps", "and config.num_epochs are both 0, so there is nothing to train",
              "set --config.num_steps or --config.num_epochs to a positive value")
    if num_devices is not None and config.batch_size % num_devices:
        _fail("batch_size", f"is {config.batch_size}, which {num_devices} devices do not divide",
              f"use a multiple of {num_devices}, e.g. {num_devices * max(1, config.batch_size // num_devices)}")
    if config.batch_size % num_processes:
        _fail("batch_size", f"is {config.batch_size}, which {num_processes} processes do not divide",
              f"use a multiple of {num_processes}")
    _check_micro_batch(config, method, num_devices)
    if config.num_steps > 0:
        check_profile_steps(config, config.num_steps)
    _check_model(config)
    _check_multicrop(config, method)
    _check_frozen_paths(config, method)
    _check_evals(config, method)
    method.validate(config)


def _check_micro_batch(config, method, num_devices: Optional[int]) -> None:
    """Gradient caching splits the global batch into ``batch_size / micro_batch_size`` micro-batches,
    each spread evenly over the devices (clrjax/gradient_cache.py)."""
    m, batch = config.micro_batch_size, config.batch_size
    if isinstance(m, bool) or not isinstance(m, int) or m < 0:
        _fail("micro_batch_size", f"is {m!r} but must be a whole number >= 0",
              "set --config.micro_batch_size to e.g. batch_size / 4 (0 = no gradient caching)")
    if m == 0:
        return
    if batch % m:
        divisors = [d for d in range(1, batch + 1) if batch % d == 0 and d < batch]
        _fail("micro_batch_size", f"is {m}, which does not divide config.batch_size={batch}",
              f"set --config.micro_batch_size to a divisor of the batch size, e.g. "
              f"{max([d for d in divisors if d <= m] or [batch])}")
    if num_devices is not None and m % num_devices:
        _fail("micro_batch_size", f"is {m} but each micro-batch is spread over the {num_devices} devices, "
              f"so per-device micro-batches of batch_size/{num_devices}={batch // num_devices} would not divide "
              f"evenly", f"set --config.micro_batch_size to a multiple of {num_devices} that divides {batch}, e.g. "
              f"{num_devices * max(1, m // num_devices)}")
    if not method.supports_gradient_cache:
        _fail("micro_batch_size", f"is {m} but the {config.method} method does not support gradient caching "
              "(its forward pass mixes examples)", "set --config.micro_batch_size=0")


def _check_evals(config, method) -> None:
    """An evaluator that reads a text tower (zero_shot, retrieval) only for an image-text method;
    prompt templates with one {} each (clrjax/evaluation/periodic.py, zero_shot.py)."""
    from clrjax.evaluation import periodic, zero_shot  # the evaluator registry says what each reads

    for name, every in periodic.enabled(config).items():
        if periodic.EVALUATORS.get(name).needs == "towers" and not getattr(method, "uses_text", False):
            _fail(f"evals.{name}.every_steps", f"is {every} but {config.method} has no text tower, which {name} "
                  "encodes captions with", f"set --config.evals.{name}.every_steps=0 (or train clip or siglip)")
    for template in config.evals.zero_shot.templates:
        problem = zero_shot.template_problem(template)
        if problem:
            _fail("evals.zero_shot.templates", f"has {template!r}, which {problem}",
                  "give templates such as '(\"a photo of a {}.\",)'")


def check_profile_steps(config, total_steps: int) -> None:
    """The traced steps ``a+1..b`` of ``config.profile_steps`` must lie within the run's ``total_steps``."""
    if len(config.profile_steps) == 2 and config.profile_steps[1] > total_steps:
        a, b = config.profile_steps
        _fail("profile_steps", f"is ({a}, {b}) but the run has only {total_steps} steps",
              f"set --config.profile_steps to a range within them, e.g. '({min(a, max(0, total_steps - 1))}, "
              f"{total_steps})'")


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


def _check_multicrop(config, method) -> None:
    """Local crops only for a method that compares them, with sensible scales and a size the encoder takes."""
    mc = config.augment.multicrop
    if mc.num_local == 0:
        return
    if not method.supports_multicrop:
        from clrjax import methods  # local: the registry lists the methods that do support it

        able = [n for n in methods.names() if methods.get(n).supports_multicrop]
        _fail("augment.multicrop.num_local", f"is {mc.num_local} but the {config.method} method does not "
              f"support multi-crop ({', '.join(able)} do)", "set --config.augment.multicrop.num_local=0")
    if mc.local_scale[1] > mc.global_scale[1]:
        _fail("augment.multicrop.local_scale", f"is {tuple(mc.local_scale)} but local crops may not cover more of "
              f"the image than the global crops (global_scale {tuple(mc.global_scale)})",
              "set it below global_scale, e.g. '(0.05, 0.14)' with global_scale '(0.14, 1.0)'")
    if mc.local_size > config.augment.crop_size:
        _fail("augment.multicrop.local_size", f"is {mc.local_size} but local crops must not be larger than the "
              f"global crops (augment.crop_size={config.augment.crop_size})",
              f"set it to at most {config.augment.crop_size}, e.g. {max(1, config.augment.crop_size // 2)}")
    from clrjax import models  # local: the encoder says which input sides it takes

    try:
        models.check_input_size(config.model.to_dict(), mc.local_size)
    except ValueError as err:
        raise ConfigError(f"config.augment.multicrop.local_size is {mc.local_size}: {err}") from None


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
    """The path of the datasets read from your own files (their other fields are in FIELD_SPECS)."""
    d = config.dataset
    if d.name not in FILE_DATASETS:
        return
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


# built-in datasets without captions (csv/tsv/webdataset and TFDS datasets read dataset.caption_column)
UNCAPTIONED_DATASETS = ("digits", "fashion_mnist", "synthetic", "image_folder")


def _check_text(config) -> None:
    """Captions only where a dataset can have them; a SentencePiece vocabulary that exists."""
    column, name = config.dataset.caption_column, config.dataset.name
    if column and name in UNCAPTIONED_DATASETS:
        _fail("dataset.caption_column", f"is {column!r} but {name} has no captions",
              "use a dataset with captions (csv, tsv, webdataset, a TFDS dataset with a caption feature) or "
              "set --config.dataset.caption_column=''")
    if column and name == "webdataset" and column != "txt":
        _fail("dataset.caption_column", f"is {column!r} but webdataset captions are the .txt members",
              "set --config.dataset.caption_column=txt")
    kind = config.text.tokenizer
    if kind in ("sentencepiece", "bpe"):
        vocab = config.text.vocab_file
        what = "a SentencePiece .model file" if kind == "sentencepiece" else "a tokenizers tokenizer.json file"
        if not vocab:
            _fail("text.vocab_file", f"is empty but text.tokenizer is {kind!r}",
                  f"set --config.text.vocab_file to {what} (or text.tokenizer=bytes)")
        if not os.path.isfile(os.path.expanduser(vocab)):
            _fail("text.vocab_file", f"is {vocab!r}, which does not exist", f"set --config.text.vocab_file to {what}")


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
    for key, value in models.resolve_model_config(config.model).items():
        # The encoder checks each field's kind; sizes also get the width bound (a typo of 1e12 channels
        # would otherwise fail only when the parameters are allocated).
        numbers_in = value if _is_sequence(value) else (value,)
        if any(isinstance(v, numbers.Real) and not isinstance(v, bool) and not v <= MAX_WIDTH for v in numbers_in):
            _fail(f"model.{key}", f"is {_show(value)} but its numbers must be finite and at most {MAX_WIDTH}, "
                  "the width bound", f"set --config.model.{key} to a smaller value")
    try:
        models.check_input_size(config.model.to_dict(), config.augment.crop_size)
    except ValueError as err:
        raise ConfigError(f"config.augment.crop_size is {config.augment.crop_size}: {err}") from None


def _check_frozen_paths(config, method) -> None:
    """Every ``optimizer.freeze`` path names parameters of the method's model (an abstract init:
    shapes only, nothing computed), outside the online probe, which has its own optimizer."""
    paths = tuple(config.optimizer.freeze)
    if not paths:
        return
    import jax  # local: validation without frozen paths imports no JAX
    from clrjax import optim

    model = method.build_model(config, 2)  # parameter names do not depend on the class count
    crop = config.augment.crop_size
    dummy = jax.ShapeDtypeStruct((2, crop, crop, 3), "float32")
    params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), dummy)["params"]
    trained = {k: v for k, v in params.items() if k != "probe"}
    for path in paths:
        if path.strip("/").split("/")[0] == "probe":
            _fail("optimizer.freeze", f"names {path!r}, the online probe, which config.optimizer does not train",
                  "remove it (the probe's optimizer is config.probe)")
        if not optim.frozen_leaf_paths(trained, (path.strip("/"),)):
            hint = " (only ViT encoders have a patch embedding)" if path.endswith("patch_embed") else ""
            example = f"encoder/{sorted(trained['encoder'])[0]}" if trained.get("encoder") else sorted(trained)[0]
            _fail("optimizer.freeze", f"names {path!r}, but this {config.method} model with the "
                  f"{config.model.name} encoder has no such parameters{hint}", f"name a module of it such as {example!r}, or set "
                  "--config.optimizer.freeze='()' to freeze nothing")


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
