"""Bad input: every case fails with one clear sentence and loses nothing already saved.

Each case runs the real entry point (``train.train``, ``load_config_file``,
``TfdsSource`` or the ``experiments/train.py`` CLI) and is checked three ways:

* ``test_message``: the message holds the case's key phrase;
* ``test_outcome``: the exception type (in process) or exit status (CLI;
  "+ traceback" is appended when one was printed, so "exit 3" means one line);
* ``test_nothing_saved_is_lost``: the workdir it was pointed at, a finished
  tiny run with checkpoints, is byte-for-byte unchanged; a fresh workdir
  stays without files.

docs/BAD_INPUT.md is generated from these runs, never typed by hand::

    .venv/bin/python tests/test_bad_input.py > docs/BAD_INPUT.md
"""
import contextlib
import dataclasses
import errno
import functools
import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Callable, Optional

if __name__ == "__main__":  # as a script: the same environment conftest.py gives the tests
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import tests.conftest  # noqa: F401  (sets XLA_FLAGS etc. before jax is imported)

import numpy as np
import pytest

from clrjax import config as config_lib
from clrjax import train
from clrjax.data import sources
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CLI = os.path.join(ROOT, "experiments", "train.py")
DIGITS = os.path.join(ROOT, "configs", "simclr.py") + ":digits"
# tests/test_train.py's tiny config with num_steps=2: the same step program, so the shared
# compilation cache serves whichever of the two files compiles it second.
TINY = {
    "model.widths": (8, 16, 16, 16), "projector.hidden_dims": (32,), "projector.out_dim": 16,
    "batch_size": 32, "num_steps": 2, "log_every_steps": 1, "checkpoint.every_steps": 1,
    "checkpoint.async_save": False, "eval.final": False,
    "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0,
}

# Fixes the checks wait for (numbers as in docs/BAD_INPUT.md and the Reliability report).


# --------------------------------------------------------------------------- the run context


class Context:
    """Workdirs and scratch space for one case; remembers what to compare afterwards."""

    def __init__(self, saved_run: str, scratch: str):
        self._saved_run, self.scratch = saved_run, scratch
        self.watched: dict = {}   # workdir -> file digests before the case ran

    def saved_run(self) -> str:
        """A fresh copy of a finished 2-step SimCLR run (config.json, checkpoints 1 and 2)."""
        path = os.path.join(self.scratch, "run")
        shutil.copytree(self._saved_run, path)
        return self._watch(path)

    def fresh_workdir(self) -> str:
        return self._watch(os.path.join(self.scratch, "fresh"))

    def path(self, name: str) -> str:
        return os.path.join(self.scratch, name)

    def _watch(self, path: str) -> str:
        self.watched[path] = digests(path)
        return path

    def lost(self) -> list:
        """Workdirs whose files changed while the case ran."""
        return [p for p, before in self.watched.items() if digests(p) != before]


def digests(directory: str) -> dict:
    """{relative path: sha256} of every file under ``directory`` ({} if it does not exist)."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def tiny(method: str = "simclr", /, **overrides):
    """The digits preset shrunk to milliseconds per step, with ``overrides`` (dotted keys)."""
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", f"{method}.py") + ":digits")
    return config_lib.apply_overrides(config, {**TINY, **overrides})


def with_unknown_key(config, dotted: str, value):
    """Adds a key the config does not have (the validator must reject it)."""
    *parents, leaf = dotted.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
    return config


# --------------------------------------------------------------------------- what a case returns


@dataclasses.dataclass(frozen=True)
class Outcome:
    kind: str      # exception class name, or "exit N[ + traceback]" for the CLI
    message: str   # the exact message (CLI: stderr without log lines)


class CliExit(Exception):
    def __init__(self, returncode: int, stderr: str):
        super().__init__(stderr)
        self.returncode, self.stderr = returncode, stderr


def outcome_of(run: Callable[[Context], None], ctx: Context) -> Outcome:
    try:
        run(ctx)
    except CliExit as err:
        traceback = " + traceback" if "Traceback (most recent call last)" in err.stderr else ""
        return Outcome(f"exit {err.returncode}{traceback}", cli_message(err.stderr))
    except Exception as err:  # the case's expected failure, whatever its type
        return Outcome(type(err).__name__, str(err))
    return Outcome("no error", "")


def cli_message(stderr: str) -> str:
    """The user-facing part of stderr: log lines dropped; a traceback reduced to its last exception."""
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not _is_log_line(ln)]
    starts = [i for i, ln in enumerate(lines) if not ln.startswith((" ", "\t"))]
    return " ".join(ln.strip() for ln in lines[starts[-1]:]) if starts else ""


def _is_log_line(line: str) -> bool:
    return (line[:1] in "IWEF" and line[1:5].isdigit()) or line.startswith(("WARNING:", "INFO:", "Pass --help"))


def run_cli(*args: str, devices: int = 2, program: str = TRAIN_CLI) -> None:
    env = dict(os.environ, XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, program, *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    raise CliExit(proc.returncode, proc.stderr)


def run_program(name: str, *args: str) -> None:
    """Another program of experiments/ (evaluation, export, benchmark) through run_cli."""
    run_cli(*args, program=os.path.join(ROOT, "experiments", f"{name}.py"))


# --------------------------------------------------------------------------- corrupt data on disk


def write_idx(directory: str, stem: str, raw: bytes, compress: bool = True) -> None:
    os.makedirs(directory, exist_ok=True)
    opener = gzip.open if compress else open
    with opener(os.path.join(directory, stem + (".gz" if compress else "")), "wb") as f:
        f.write(raw)


def idx_header(magic_type: int, dims) -> bytes:
    return struct.pack(">HBB", 0, magic_type, len(dims)) + struct.pack(f">{len(dims)}I", *dims)


def fashion_dir_with_images(ctx: Context, raw_images: bytes) -> str:
    """A Fashion-MNIST dir whose train images file holds ``raw_images`` (labels are valid)."""
    directory = ctx.path("fashion")
    write_idx(directory, "train-images-idx3-ubyte", raw_images)
    write_idx(directory, "train-labels-idx1-ubyte", idx_header(0x08, (60000,)) + bytes(60000))
    return directory


def fashion_with_cut_gzip(ctx: Context) -> str:
    directory = fashion_dir_with_images(ctx, idx_header(0x08, (60000, 28, 28)) + bytes(5000))
    path = os.path.join(directory, "train-images-idx3-ubyte.gz")
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])   # a download cut short
    return directory


def train_on(ctx: Context, workdir: str, **overrides) -> None:
    train.train(tiny(**overrides), workdir)


def with_value(config, dotted: str, value):
    """``config`` with ``dotted`` set to ``value`` of any type (as a hand-edited config.json can hold)."""
    tree = config.to_dict()
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        node = node[name]
    node[leaf] = value
    import ml_collections
    return ml_collections.ConfigDict(tree)


def fashion_without_test_files(ctx: Context) -> str:
    """A Fashion-MNIST dir with valid train files (all-zero images) and no t10k test files."""
    return fashion_dir_with_images(ctx, idx_header(0x08, (60000, 28, 28)) + bytes(60000 * 28 * 28))


def train_tiny_tfds(ctx: Context, workdir: str, **overrides) -> None:
    """Trains on the tiny TFDS dataset (split 'train' only) registered for the call as 'bad_input_tfds'."""
    from clrjax.data.datasets import DATASETS, Dataset

    tfds, builder = _tiny_tfds_builder()
    data_dir = ctx.path("tfds")
    with contextlib.redirect_stdout(sys.stderr):
        builder(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    DATASETS.register(Dataset("bad_input_tfds", lambda cfg, split: sources.TfdsSource(
        "clrjax_bad_input_tiny", split, cfg["data_dir"]), lambda cfg: ((8, 8, 3), 2)))
    try:
        train_on(ctx, workdir, **{"dataset.name": "bad_input_tfds", "dataset.data_dir": data_dir,
                                  "batch_size": 16, **overrides})
    finally:
        DATASETS.unregister("bad_input_tfds")


def result_write_fails(ctx: Context) -> None:
    """The evaluation programs' result write (clrjax.cli.write_or_fail) on a full disk, in process."""
    from clrjax import cli

    def full_disk():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), ctx.path("out/knn_eval.json"))

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            cli.write_or_fail("knn_eval", full_disk, "knn_eval.json")
        except SystemExit as exit_:
            raise CliExit(exit_.code, stderr.getvalue()) from None


@functools.lru_cache(maxsize=None)
def _tiny_tfds_builder():
    import tensorflow_datasets as tfds

    class ClrjaxBadInputTiny(tfds.core.GeneratorBasedBuilder):
        """16 fixed-size uint8 images, array_record, built without network or TensorFlow."""
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(8, 8, 3), dtype=np.uint8),
                "label": tfds.features.ClassLabel(num_classes=2)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(16):
                yield i, {"image": np.full((8, 8, 3), i, np.uint8), "label": i % 2}

    return tfds, ClrjaxBadInputTiny


def corrupt_tfds(ctx: Context, damage: Callable[[str], None]) -> None:
    """Builds the tiny TFDS dataset, applies ``damage`` to its shard file, opens it."""
    tfds, builder = _tiny_tfds_builder()
    data_dir = ctx.path("tfds")
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; keep stdout for the table
        builder(data_dir=data_dir, file_format="array_record").download_and_prepare(
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    version_dir = os.path.join(data_dir, "clrjax_bad_input_tiny", "1.0.0")
    shard = next(os.path.join(version_dir, n) for n in os.listdir(version_dir) if ".array_record" in n)
    damage(shard)
    sources.TfdsSource("clrjax_bad_input_tiny", "train", data_dir)


def csv_captioned_list(ctx: Context, header: str = "path,label,text", caption: str = "a digit") -> str:
    """40 8x8 grayscale PNGs listed in a CSV with ``header``; every row's last cell is ``caption``."""
    from PIL import Image

    folder = ctx.path("captioned")
    os.makedirs(folder, exist_ok=True)
    rows = [header]
    for k in range(40):
        Image.fromarray(np.full((8, 8), k * 6, np.uint8)).save(os.path.join(folder, f"{k}.png"))
        rows.append(f"{k}.png,{k % 2},{caption}")
    path = os.path.join(folder, "list.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def train_on_captions(ctx: Context, path: str, **overrides) -> None:
    train_on(ctx, ctx.fresh_workdir(), **{"dataset.name": "csv", "dataset.path": path, "dataset.channels": 1,
                                         "dataset.image_size": 8, "dataset.caption_column": "text", **overrides})


def tsv_list_missing_image(ctx: Context) -> str:
    """csv_captioned_list as a TSV list (list.tsv) whose image 2.png (line 4) was deleted."""
    csv_path = csv_captioned_list(ctx)
    folder = os.path.dirname(csv_path)
    os.remove(os.path.join(folder, "2.png"))
    path = os.path.join(folder, "list.tsv")
    with open(csv_path) as f, open(path, "w") as g:
        g.write(f.read().replace(",", "\t"))
    return path


def train_on_gcs_without_gcsfs(ctx: Context) -> None:
    """A gs:// workdir where neither gcsfs nor TensorFlow can be imported (clrjax/storage.py)."""
    import importlib.util
    from unittest import mock

    real = importlib.util.find_spec
    missing = lambda name, *args: None if name in ("gcsfs", "tensorflow") else real(name, *args)
    with mock.patch("importlib.util.find_spec", missing):
        train_on(ctx, "gs://my-bucket/run")


def load_towers_of_encoder_export(ctx: Context) -> None:
    """clrjax.export.load_image_text on the export of a SimCLR run (an image encoder, no text tower)."""
    from clrjax.evaluation import restore
    from clrjax.export import load_image_text

    restore.export_run(ctx.saved_run(), ctx.path("export"), formats=["orbax"])
    load_image_text(ctx.path("export"))


def truncate_half(path: str) -> None:
    with open(path, "rb") as f:
        raw = f.read()
    with open(path, "wb") as f:
        f.write(raw[: len(raw) // 2])


# --------------------------------------------------------------------------- the cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str                          # test id
    case: str                          # what is wrong (table column)
    given: str                         # the input (table column)
    run: Callable[[Context], None]     # must fail
    kind: str                          # expected Outcome.kind
    phrase: str                        # key phrase the message must hold


CASES = [
    # ---- config fields (train.train on a copy of a finished run: it must stay untouched)
    Case("unknown_key", "unknown config key", "config.batch_sise=32",
         lambda c: train.train(with_unknown_key(tiny(), "batch_sise", 32), c.saved_run()),
         "ConfigError", "config.batch_sise is not a known field"),
    Case("batch_not_divisible", "batch not divisible by the devices", "batch_size=36 on 8 devices",
         lambda c: train_on(c, c.saved_run(), batch_size=36),
         "ConfigError", "config.batch_size is 36, which 8 devices do not divide"),
    Case("batch_larger_than_dataset", "batch larger than the dataset", "batch_size=2048 on digits (1,438)",
         lambda c: train_on(c, c.saved_run(), batch_size=2048),
         "ConfigError", "the training split has only 1438 examples"),
    Case("nonpositive_temperature", "non-positive temperature", "loss.temperature=0.0",
         lambda c: train_on(c, c.saved_run(), **{"loss.temperature": 0.0}),
         "ConfigError", "config.loss.temperature is 0.0 but must be a positive number"),
    Case("nonpositive_lr", "non-positive learning rate", "optimizer.lr=-0.1",
         lambda c: train_on(c, c.saved_run(), **{"optimizer.lr": -0.1}),
         "ConfigError", "config.optimizer.lr is -0.1 but must be a positive number"),
    Case("unknown_method", "unknown method name", "method='simclrr'",
         lambda c: train_on(c, c.saved_run(), method="simclrr"),
         "ConfigError", "config.method is 'simclrr', which is not supported"),
    Case("unknown_model", "unknown model name", "model.name='resnet9'",
         lambda c: train_on(c, c.saved_run(), model={"name": "resnet9"}),
         "ConfigError", "config.model is invalid"),
    Case("unknown_dataset", "unknown dataset name", "dataset.name='mnist'",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "mnist"}),
         "ConfigError", "config.dataset.name is 'mnist', which is not supported"),
    Case("unknown_loss_kwarg", "unknown loss keyword", "loss.temprature=0.1",
         lambda c: train_on(c, c.saved_run(), **{"loss.temprature": 0.1}),
         "ConfigError", "config.loss.temprature is not an argument of the simclr loss"),
    Case("unknown_model_kwarg", "unknown model keyword", "model.width=3",
         lambda c: train_on(c, c.saved_run(), **{"model.width": 3}),
         "ConfigError", "model config field 'width' is not an option of 'cnn_small'"),
    Case("probability_above_one", "probability outside [0, 1]", "augment.flip_prob=1.5",
         lambda c: train_on(c, c.saved_run(), **{"augment.flip_prob": 1.5}),
         "ConfigError", "config.augment.flip_prob is 1.5 but probabilities must lie in [0, 1]"),
    Case("probability_negative_in_pair", "per-view probability below 0", "augment.blur_prob=(-0.1, 0.5)",
         lambda c: train_on(c, c.saved_run(), **{"augment.blur_prob": (-0.1, 0.5)}),
         "ConfigError", "config.augment.blur_prob is (-0.1, 0.5) but probabilities must lie in [0, 1]"),
    Case("crop_scale_reversed", "crop_scale reversed", "augment.crop_scale=(0.9, 0.2)",
         lambda c: train_on(c, c.saved_run(), **{"augment.crop_scale": (0.9, 0.2)}),
         "ConfigError", "must be (min, max) with 0 < min <= max <= 1"),
    Case("nothing_to_train", "num_steps = num_epochs = 0", "num_steps=0, num_epochs=0",
         lambda c: train_on(c, c.saved_run(), num_steps=0, num_epochs=0.0),
         "ConfigError", "are both 0, so there is nothing to train"),
    Case("warmup_longer_than_training", "warmup longer than training", "optimizer.warmup_epochs=100, num_steps=2",
         lambda c: train_on(c, c.saved_run(), **{"optimizer.warmup_epochs": 100.0}),
         "ConfigError", "longer than the 2 training steps"),
    Case("mean_fewer_values_than_channels", "mean shorter than the channels",
         "synthetic 3-channel images, augment.mean=(0.5, 0.5)",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "synthetic", "dataset.num_examples": 64,
                                                 "dataset.image_size": 8, "augment.mean": (0.5, 0.5)}),
         "ConfigError", "config.augment.mean has 2 values but the images have 3 channels"),
    Case("mean_more_values_than_channels", "mean longer than the channels (fresh workdir)",
         "synthetic 3-channel images, augment.mean=(0.1, 0.2, 0.3, 0.4)",
         lambda c: train_on(c, c.fresh_workdir(), **{"dataset.name": "synthetic", "dataset.num_examples": 64,
                                                     "dataset.image_size": 8, "augment.std": (0.2,) * 3,
                                                     "augment.mean": (0.1, 0.2, 0.3, 0.4)}),
         "ConfigError", "augment.mean has 4 values"),
    Case("vit_crop_not_multiple_of_patch", "image size the ViT cannot take", "model vit_tiny, augment.crop_size=30",
         lambda c: train_on(c, c.saved_run(), model={"name": "vit_tiny"}, **{"augment.crop_size": 30}),
         "ConfigError", "'vit_tiny' needs an image size divisible by its patch size 16, got 30"),
    Case("resnet50_stem_on_8x8", "image size the ResNet-50 stem cannot take", "model resnet50 on 8x8 digits",
         lambda c: train_on(c, c.saved_run(), model={"name": "resnet50"}),
         "ConfigError", "'resnet50' downsamples by 32, so images of size 8 are too small"),
    # ---- silent changes and late failures of issue 17 (field ranges: clrjax/config.py FIELD_SPECS)
    Case("negative_knn_interval", "negative periodic kNN interval", "evals.knn.every_steps=-1",
         lambda c: train_on(c, c.saved_run(), **{"evals.knn.every_steps": -1}),
         "ConfigError", "config.evals.knn.every_steps is -1 but must be a whole number >= 0"),
    Case("negative_max_train_examples", "negative probe-set cap", "eval.max_train_examples=-5",
         lambda c: train_on(c, c.saved_run(), **{"eval.max_train_examples": -5}),
         "ConfigError", "config.eval.max_train_examples is -5 but must be a whole number >= 0"),
    Case("huge_num_steps", "more steps than the step counter holds", "num_steps=10**12",
         lambda c: train_on(c, c.saved_run(), num_steps=10**12),
         "ConfigError", "config.num_steps is 1000000000000 but must be at most 2147483647, the step counter is int32"),
    Case("unknown_sharding_mode", "unknown state layout", "sharding.mode='zero3'",
         lambda c: train_on(c, c.saved_run(), **{"sharding.mode": "zero3"}),
         "ConfigError", "config.sharding.mode is 'zero3', which is not supported"),
    Case("profile_beyond_the_run", "profiled steps beyond the end of the run", "profile_steps=(1, 10), num_steps=2",
         lambda c: train_on(c, c.saved_run(), profile_steps=(1, 10)),
         "ConfigError", "config.profile_steps is (1, 10) but the run has only 2 steps"),
    Case("zero_projector_width", "zero width in the projector", "projector.hidden_dims=(0,)",
         lambda c: train_on(c, c.saved_run(), **{"projector.hidden_dims": (0,)}),
         "ConfigError", "config.projector.hidden_dims is (0,) but must be a tuple of positive layer widths"),
    Case("micro_batch_not_dividing", "gradient-cache micro-batch that does not divide the batch",
         "micro_batch_size=12 with batch_size=32",
         lambda c: train_on(c, c.saved_run(), micro_batch_size=12),
         "ConfigError", "config.micro_batch_size is 12, which does not divide config.batch_size=32"),
    Case("zero_chunk_size", "zero loss chunk size (failed at the first step)", "loss.chunk_size=0",
         lambda c: train_on(c, c.saved_run(), **{"loss.chunk_size": 0}),
         "ConfigError", "config.loss.chunk_size is 0 but must be a positive integer or None"),
    Case("column_split_indivisible", "column_split the devices cannot split (failed at the first step)",
         "barlow_twins, loss.impl='column_split', projector.out_dim=12 on 8 devices",
         lambda c: train.train(tiny("barlow_twins", **{"loss.impl": "column_split", "projector.out_dim": 12}),
                               c.fresh_workdir()),
         "ConfigError", "config.loss.impl is 'column_split', which needs config.projector.out_dim (12) divisible"),
    Case("momentum_is_one", "target momentum outside [0, 1)", "byol, momentum.base=1.0",
         lambda c: train.train(tiny("byol", **{"momentum.base": 1.0}), c.fresh_workdir()),
         "ConfigError", "config.momentum.base is 1.0 but must be in [0, 1)"),
    Case("momentum_final_below_base", "final momentum below the base momentum", "moco_v3, momentum.final=0.9",
         lambda c: train.train(tiny("moco_v3", **{"momentum.final": 0.9}), c.fresh_workdir()),
         "ConfigError", "config.momentum.final is 0.9 but must lie in [momentum.base, 1]"),
    Case("lit_tower_of_another_architecture", "LiT image tower checkpoint of another architecture",
         "clip, image_tower.init_from=<a simclr run with model.widths (8, 16, 16, 16)>, model.widths=(8, 32, 16, 16)",
         lambda c: train.train(tiny("clip", **{"image_tower.init_from": c.saved_run(), "image_tower.locked": True,
                                               "model.widths": (8, 32, 16, 16)}), c.fresh_workdir()),
         "ConfigError", "does not fit config.model"),
    Case("lit_locked_without_checkpoint", "LiT lock without a pretrained image tower",
         "clip, image_tower.locked=True, image_tower.init_from=''",
         lambda c: train.train(tiny("clip", **{"image_tower.locked": True}), c.fresh_workdir()),
         "ConfigError", "config.image_tower.locked is True but config.image_tower.init_from is empty"),
    Case("periodic_zero_shot_without_text_tower", "periodic zero-shot for a method without a text tower",
         "evals.zero_shot.every_steps=2 on simclr",
         lambda c: train_on(c, c.saved_run(), **{"evals.zero_shot.every_steps": 2}),
         "ConfigError", "config.evals.zero_shot.every_steps is 2 but simclr has no text tower"),
    Case("zero_shot_template_without_placeholder", "zero-shot prompt template without {}",
         "clip, evals.zero_shot.templates=('a photo',)",
         lambda c: train.train(tiny("clip", **{"evals.zero_shot.templates": ("a photo",)}), c.fresh_workdir()),
         "ConfigError", "config.evals.zero_shot.templates has 'a photo', which must hold {} exactly once"),
    Case("periodic_zero_shot_split_without_class_names", "periodic zero-shot on a test split without class names",
         "clip on a captioned CSV with integer labels, evals.zero_shot.every_steps=1",
         lambda c: train.train(tiny("clip", **{"dataset.name": "csv", "dataset.path": csv_captioned_list(c),
                                               "dataset.channels": 1, "dataset.image_size": 8,
                                               "dataset.caption_column": "text", "dataset.split_fraction": 0.25,
                                               "evals.zero_shot.every_steps": 1}), c.fresh_workdir()),
         "ConfigError", "config.evals.zero_shot.every_steps is 1 but the test split 'test' of csv has no class names"),
    Case("cli_zero_shot_eval_on_simclr_run", "zero-shot/retrieval program on a run without a text tower",
         "zero_shot_eval.py --workdir=<a simclr run>",
         lambda c: run_program("zero_shot_eval", f"--workdir={c.saved_run()}"),
         "exit 3", "is a simclr run, which has no text tower; zero-shot and retrieval need an image-text run"),
    Case("queue_not_a_batch_multiple", "queue size not divisible by the global batch",
         "moco_v2, queue.size=1000, batch_size=32",
         lambda c: train.train(tiny("moco_v2", **{"queue.size": 1000}), c.fresh_workdir()),
         "ConfigError", "config.queue.size is 1000, which is not a positive multiple of the global batch"),
    Case("freeze_patch_embed_without_vit", "frozen patch embedding on an encoder without one",
         "optimizer.freeze=('encoder/patch_embed',), cnn_small",
         lambda c: train_on(c, c.saved_run(), **{"optimizer.freeze": ("encoder/patch_embed",)}),
         "ConfigError", "config.optimizer.freeze names 'encoder/patch_embed', but this simclr model with the "
                        "cnn_small encoder has no such parameters (only ViT encoders have a patch embedding)"),
    Case("multicrop_local_not_multiple_of_patch", "local crop size the ViT patch does not divide",
         "model vit_tiny, crop_size=32, augment.multicrop.num_local=2, local_size=24",
         lambda c: train_on(c, c.saved_run(), model={"name": "vit_tiny"},
                            **{"augment.crop_size": 32, "augment.multicrop.num_local": 2,
                               "augment.multicrop.local_size": 24}),
         "ConfigError", "config.augment.multicrop.local_size is 24: 'vit_tiny' needs an image size divisible "
                        "by its patch size 16, got 24"),
    Case("multicrop_unsupported_method", "multi-crop for a method without a multi-crop loss",
         "barlow_twins, augment.multicrop.num_local=2",
         lambda c: train.train(tiny("barlow_twins", **{"augment.multicrop.num_local": 2,
                                                       "augment.multicrop.local_size": 4}), c.fresh_workdir()),
         "ConfigError", "config.augment.multicrop.num_local is 2 but the barlow_twins method does not support "
                        "multi-crop"),
    Case("multicrop_local_scale_reversed", "local crop scale reversed", "augment.multicrop.local_scale=(0.14, 0.05)",
         lambda c: train_on(c, c.saved_run(), **{"augment.multicrop.num_local": 2,
                                                 "augment.multicrop.local_scale": (0.14, 0.05)}),
         "ConfigError", "config.augment.multicrop.local_scale"),
    Case("multicrop_local_scale_above_global", "local crops larger than the global ones",
         "augment.multicrop.local_scale=(0.05, 0.5), global_scale=(0.14, 0.3)",
         lambda c: train_on(c, c.saved_run(), **{"augment.multicrop.num_local": 2, "augment.multicrop.local_size": 4,
                                                 "augment.multicrop.local_scale": (0.05, 0.5),
                                                 "augment.multicrop.global_scale": (0.14, 0.3)}),
         "ConfigError", "config.augment.multicrop.local_scale is (0.05, 0.5) but local crops may not cover more"),
    Case("zero_std", "zero normalisation std (was reported as non-finite values)", "augment.std=(0.0,)",
         lambda c: train_on(c, c.saved_run(), **{"augment.std": (0.0,)}),
         "ConfigError", "config.augment.std is (0.0,) but must be a tuple of per-channel stds of pixels / 255"),
    Case("mean_in_pixel_units", "normalisation mean in 0..255 units", "augment.mean=(123.675,)",
         lambda c: train_on(c, c.saved_run(), **{"augment.mean": (123.675,)}),
         "ConfigError", "config.augment.mean is (123.675,) but must be a tuple of per-channel means of pixels / 255"),
    Case("wrong_type_in_config", "string where a number belongs (hand-edited config)", "batch_size='32'",
         lambda c: train.train(with_value(tiny(), "batch_size", "32"), c.saved_run()),
         "ConfigError", "config.batch_size is '32' but must be a positive integer"),
    Case("section_given_a_value", "a value where a section belongs", "optimizer=0.1",
         lambda c: train.train(with_value(tiny(), "optimizer", 0.1), c.saved_run()),
         "ConfigError", "config.optimizer is 0.1 but is a section of fields, not a value"),
    Case("unknown_test_split", "evaluation split the dataset lacks", "dataset.test_split='validation' on digits",
         lambda c: train_on(c, c.saved_run(), **{"dataset.test_split": "validation"}),
         "ConfigError", "config.dataset.test_split is 'validation', which digits does not have"),
    Case("tfds_unknown_test_split", "evaluation split a TFDS dataset lacks (failed after training)",
         "TFDS dataset with split 'train' only, dataset.test_split='validation', fresh workdir",
         lambda c: train_tiny_tfds(c, c.fresh_workdir(), **{"dataset.test_split": "validation",
                                                            "eval.final": True}),
         "DataError", "split 'validation'"),
    Case("fashion_mnist_without_test_files", "Fashion-MNIST dir without its test files (failed after training)",
         "train files only, eval.final=True, fresh workdir",
         lambda c: train_on(c, c.fresh_workdir(), **{"dataset.name": "fashion_mnist", "eval.final": True,
                                                     "dataset.data_dir": fashion_without_test_files(c)}),
         "DataError", "t10k-images-idx3-ubyte.gz does not exist"),
    # ---- files and directories
    Case("fashion_mnist_missing_dir", "missing dataset directory", "fashion_mnist, data_dir=/nonexistent",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "fashion_mnist", "dataset.data_dir": "/nonexistent"}),
         "DataError", "Fashion-MNIST file /nonexistent/train-images-idx3-ubyte.gz does not exist"),
    Case("idx_bad_magic", "corrupt IDX: bad magic number", "train images with type code 0x09",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "fashion_mnist", "dataset.data_dir":
                                                 fashion_dir_with_images(c, idx_header(0x09, (60000, 28, 28)))}),
         "DataError", "has magic number 0x00000903, expected 0x00000803"),
    Case("idx_truncated", "corrupt IDX: truncated payload", "train images declaring 60000x28x28, 100 bytes",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "fashion_mnist", "dataset.data_dir":
                                                 fashion_dir_with_images(c, idx_header(0x08, (60000, 28, 28))
                                                                         + bytes(100))}),
         "DataError", "declares dims (60000, 28, 28) = 47040000 bytes but holds 100 (truncated)"),
    Case("idx_gzip_cut_short", "corrupt IDX: gzip stream cut short", "train images .gz cut in half",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "fashion_mnist",
                                                 "dataset.data_dir": fashion_with_cut_gzip(c)}),
         "DataError", "train-images-idx3-ubyte.gz: cannot be read (EOFError"),
    Case("caption_column_missing", "caption column not in the CSV/TSV list", "dataset.caption_column='text', "
         "header path,label,caption",
         lambda c: train_on_captions(c, csv_captioned_list(c, header="path,label,caption")),
         "DataError", "but not config.dataset.caption_column='text'; name the caption column there"),
    Case("caption_empty", "empty caption in the CSV/TSV list", "a caption cell of spaces",
         lambda c: train_on_captions(c, csv_captioned_list(c, caption="  ")),
         "DataError", "list.csv line 2: has an empty 'text' caption for '0.png'; write the caption"),
    Case("caption_list_missing_image", "image file missing from a captioned TSV list (found while listing)",
         "list.tsv line 4 names 2.png, deleted",
         lambda c: train_on_captions(c, tsv_list_missing_image(c), **{"dataset.name": "tsv"}),
         "DataError", "list.tsv line 4: names '2.png', and "),
    Case("caption_column_uncaptioned_dataset", "captions asked of a dataset without any",
         "dataset.caption_column='caption' on digits",
         lambda c: train_on(c, c.saved_run(), **{"dataset.caption_column": "caption"}),
         "ConfigError", "config.dataset.caption_column is 'caption' but digits has no captions"),
    Case("vocab_file_missing", "tokenizer vocabulary file does not exist",
         "text.tokenizer='sentencepiece', text.vocab_file='/nonexistent/spm.model'",
         lambda c: train_on(c, c.saved_run(), **{"text.tokenizer": "sentencepiece",
                                                 "text.vocab_file": "/nonexistent/spm.model"}),
         "ConfigError", "config.text.vocab_file is '/nonexistent/spm.model', which does not exist"),
    Case("tfds_not_prepared", "TFDS dataset missing", "cifar10, empty data_dir",
         lambda c: train_on(c, c.saved_run(), **{"dataset.name": "cifar10", "dataset.data_dir": c.path("empty")}),
         "DataError", "TFDS dataset 'cifar10' is not prepared in"),
    Case("tfds_interrupted_build", "TFDS dataset dir without dataset_info.json", "cifar10, data_dir/cifar10/ empty",
         lambda c: (os.makedirs(c.path("tfds/cifar10/3.0.2")), train_on(
             c, c.saved_run(), **{"dataset.name": "cifar10", "dataset.data_dir": c.path("tfds")})),
         "DataError", "holds no dataset_info.json (an interrupted build?)"),
    Case("tfds_truncated_array_record", "corrupt array_record: truncated shard", "shard file cut in half",
         lambda c: corrupt_tfds(c, truncate_half),
         "DataError", "its array_record files are truncated or corrupt"),
    Case("tfds_missing_shard", "corrupt array_record: shard file missing", "shard file deleted",
         lambda c: corrupt_tfds(c, os.remove),
         "DataError", "its array_record files are truncated or corrupt"),
    # ---- workdirs and checkpoints
    Case("workdir_with_other_config", "workdir holds a run with a different config", "loss.temperature changed",
         lambda c: train_on(c, c.saved_run(), **{"loss.temperature": 0.7}),
         "ConfigError", "holds a run with a different config (loss.temperature: "),
    Case("workdir_under_a_file", "unwritable workdir (parent is a file)", "workdir=<file>/run",
         lambda c: (open(c.path("a_file"), "w").close(), train_on(c, c.path("a_file/run"))),
         "ConfigError", "is not writable (Not a directory)"),
    Case("workdir_in_proc", "unwritable workdir (/proc)", "workdir=/proc/clrjax_run",
         lambda c: train_on(c, "/proc/clrjax_run"),
         "ConfigError", "is not writable (No such file or directory)"),
    Case("checkpoint_of_other_method", "checkpoint from another method", "SimCLR run resumed as TiCo, --allow_config_change",
         lambda c: train.train(tiny("tico"), c.saved_run(), allow_config_change=True),
         "ConfigError", "holds a simclr run and this config trains tico; a method change cannot resume"),
    Case("checkpoint_of_same_shape_other_method", "same-structure state, other method",
         "SimCLR run resumed as VICReg, --allow_config_change",
         lambda c: train.train(tiny("vicreg"), c.saved_run(), allow_config_change=True),
         "ConfigError", "holds a simclr run and this config trains vicreg; a method change cannot resume"),
    Case("checkpoint_of_other_shape", "checkpoint with other shapes", "projector.out_dim 16 -> 8, --allow_config_change",
         lambda c: train.train(tiny(**{"projector.out_dim": 8}), c.saved_run(), allow_config_change=True),
         "ConfigError", "shape (32, 16) in the checkpoint, (32, 8) now"),
    # ---- config files
    Case("unknown_preset", "unknown preset", "configs/simclr.py:mnist",
         lambda c: config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":mnist"),
         "ValueError", "unknown preset 'mnist'; use one of digits"),
    Case("missing_config_file", "missing config file", "configs/nope.py:digits",
         lambda c: config_lib.load_config_file("configs/nope.py:digits"),
         "ConfigError", "the config file 'configs/nope.py' does not exist"),
    Case("unknown_encoder_option", "unknown encoder in the config argument", "configs/simclr.py:digits,encoder=resnet19",
         lambda c: config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":digits,encoder=resnet19"),
         "ValueError", "encoder='resnet19' is not an encoder; use one of cnn_small, resnet18"),
    Case("unknown_config_argument_option", "unknown option in the config argument", "configs/simclr.py:digits,width=2",
         lambda c: config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":digits,width=2"),
         "ValueError", "config argument option 'width=2' is not understood; the argument is PRESET[,encoder=NAME]"),
    # ---- through the CLI (exit status and stderr as a user sees them)
    Case("cli_model_name_on_preset", "encoder changed by model.name alone", "--config.model.name=resnet18 on digits",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.fresh_workdir()}", "--config.model.name=resnet18"),
         "exit 3", "name it in the config argument instead of --config.model.name, e.g. "
                   "--config=configs/simclr.py:fashion_mnist,encoder=resnet18"),
    Case("cli_eval_unknown_preset", "unknown preset, linear_eval", "linear_eval.py --config=configs/simclr.py:mnist",
         lambda c: run_program("linear_eval", f"--workdir={c.saved_run()}", "--config=configs/simclr.py:mnist"),
         "exit 3", "unknown preset 'mnist'; use one of digits"),
    Case("cli_knn_eval_unknown_key", "unknown key, knn_eval", "knn_eval.py --config.batch_sise=32",
         lambda c: run_program("knn_eval", f"--workdir={c.saved_run()}", f"--config={DIGITS}",
                               "--config.batch_sise=32"),
         "exit 3", 'Did you mean "batch_size" instead of "batch_sise"?'),
    Case("cli_benchmark_unknown_key", "unknown key, benchmark", "benchmark.py --config.optimizer.lrr=1",
         lambda c: run_program("benchmark", f"--config={DIGITS}", "--config.optimizer.lrr=1",
                               f"--json_out={c.path('bench.json')}"),
         "exit 3", 'Did you mean "lr" instead of "lrr"?'),
    Case("cli_benchmark_bad_batch", "batch the devices do not divide, benchmark", "benchmark.py --config.batch_size=7",
         lambda c: run_program("benchmark", f"--config={DIGITS}", "--config.batch_size=7",
                               f"--json_out={c.path('bench.json')}"),
         "exit 3", "config.batch_size is 7, which 2 devices do not divide"),
    Case("cli_wrong_type", "wrong type on the command line", "--config.batch_size=abc",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.fresh_workdir()}", "--config.batch_size=abc"),
         "exit 3", "--config.batch_size=abc: invalid literal for int()"),
    Case("cli_unknown_key", "unknown key on the command line", "--config.batch_sise=32",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.fresh_workdir()}", "--config.batch_sise=32"),
         "exit 3", 'Did you mean "batch_size" instead of "batch_sise"?'),
    Case("cli_unknown_preset", "unknown preset on the command line", "--config=configs/simclr.py:mnist",
         lambda c: run_cli("--config=configs/simclr.py:mnist", f"--workdir={c.fresh_workdir()}"),
         "exit 3", "unknown preset 'mnist'; use one of digits"),
    Case("cli_missing_config_file", "missing config file on the command line", "--config=configs/nope.py:digits",
         lambda c: run_cli("--config=configs/nope.py:digits", f"--workdir={c.fresh_workdir()}"),
         "exit 3", "config error: the config file 'configs/nope.py' does not exist (relative to "),
    Case("cli_bad_value_on_saved_run", "bad value, CLI, on a finished run", "--config.loss.temperature=0",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.saved_run()}", "--config.loss.temperature=0.0"),
         "exit 3", "[process 0] config error: config.loss.temperature is 0.0 but must be a positive number"),
    Case("cli_tuple_flag_twice", "tuple flag given twice (was joined: (32,) then (64,) trained [32, 64])",
         "--config.projector.hidden_dims=(32,) --config.projector.hidden_dims=(64,)",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.fresh_workdir()}",
                           "--config.projector.hidden_dims=(32,)", "--config.projector.hidden_dims=(64,)"),
         "exit 3", "--config.projector.hidden_dims is given 2 times ((32,) then (64,)), which ml_collections "
                   "would join into (32, 64)"),
    Case("cli_negative_stop_after_steps", "negative --stop_after_steps (trained nothing, exit 0)",
         "--stop_after_steps=-1, fresh workdir",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.fresh_workdir()}", "--stop_after_steps=-1"),
         "exit 3", "train: --stop_after_steps=-1 must be a positive integer"),
    Case("cli_train_without_workdir", "train.py without --workdir (was a usage dump, exit 1)", "--config only",
         lambda c: run_cli(f"--config={DIGITS}"),
         "exit 3", "train: --config and --workdir are required"),
    Case("cli_knn_result_unwritable", "result directory that cannot be written (failed after the evaluation)",
         "knn_eval.py --out=/proc/clrjax_out",
         lambda c: run_program("knn_eval", f"--workdir={c.saved_run()}", "--out=/proc/clrjax_out"),
         "exit 3", "knn_eval: --out=/proc/clrjax_out is not writable"),
    Case("cli_linear_out_is_a_file", "--out pointing at a file (failed after the evaluation)",
         "linear_eval.py --out=<file>",
         lambda c: (open(c.path("a_file"), "w").close(),
                    run_program("linear_eval", f"--workdir={c.saved_run()}", f"--out={c.path('a_file')}")),
         "exit 3", "is a file, not a directory; pass a directory for the results"),
    Case("cli_knn_result_file_not_json", "result file to merge into is not JSON (failed after the evaluation)",
         "knn_eval.py --out=DIR, DIR/knn_eval.json cut short",
         lambda c: (os.makedirs(c.path("out")), open(c.path("out/knn_eval.json"), "w").write('{"knn": {'),
                    run_program("knn_eval", f"--workdir={c.saved_run()}", f"--out={c.path('out')}")),
         "exit 3", "knn_eval.json is not a JSON object, so the new result cannot be merged into it"),
    Case("cli_linear_eval_zero_epochs", "zero probe epochs (was checked after the encoder was restored)",
         "linear_eval.py --protocol=augmented --epochs=0",
         lambda c: run_program("linear_eval", f"--workdir={c.saved_run()}", "--protocol=augmented", "--epochs=0"),
         "exit 3", "linear_eval: --epochs=0 must be a positive integer"),
    Case("cli_result_write_fails", "result file write fails after the work (disk full)",
         "clrjax.cli.write_or_fail with ENOSPC, as knn_eval/linear_eval/export/benchmark write",
         result_write_fails,
         "exit 6", "(No space left on device); the work is done but its result is lost"),
    Case("cli_export_unknown_format", "unknown export format (was checked after the checkpoint was read)",
         "export.py --formats=onnx",
         lambda c: run_program("export", f"--workdir={c.saved_run()}", "--formats=onnx"),
         "exit 3", "export: --formats=onnx must be a comma-separated list of orbax, safetensors, torch"),
    Case("image_text_of_an_encoder_export", "both towers asked of an export without a text tower",
         "clrjax.export.load_image_text(<the export of a simclr run>)", load_towers_of_encoder_export,
         "ValueError", "is an image-encoder export without a text tower (no image_text.json); load its encoder "
                       "with clrjax.export.load_encoder"),
    Case("cli_benchmark_zero_steps", "zero timed steps, benchmark", "benchmark.py --steps=0",
         lambda c: run_program("benchmark", f"--config={DIGITS}", "--steps=0", f"--json_out={c.path('b.json')}"),
         "exit 3", "benchmark: --steps=0 must be a positive integer"),
    Case("cli_missing_dataset", "missing dataset directory, CLI", "--config.dataset.name=fashion_mnist "
         "--config.dataset.data_dir=/nonexistent",
         lambda c: run_cli(f"--config={DIGITS}", f"--workdir={c.fresh_workdir()}", "--config.dataset.name=fashion_mnist",
                           "--config.dataset.data_dir=/nonexistent"),
         "exit 3", "Fashion-MNIST file /nonexistent/train-images-idx3-ubyte.gz does not exist"),
    Case("gcs_workdir_without_gcsfs", "gs:// workdir without the gcs extra", "--workdir=gs://my-bucket/run, "
         "gcsfs not installed", train_on_gcs_without_gcsfs,
         "ConfigError", "needs the gcsfs package: pip install 'clrjax[gcs]'"),
]


# --------------------------------------------------------------------------- running them once


def make_saved_run(directory: str) -> str:
    """A finished tiny SimCLR run on the default 8-device mesh (checkpoints at steps 1 and 2)."""
    train.train(tiny(), directory)
    return directory


class Runner:
    """Runs each case once (three tests read its result) in its own scratch directory."""

    def __init__(self, root: str):
        self.root = root
        self.saved_run = make_saved_run(os.path.join(root, "saved_run"))
        self._results: dict = {}

    def result(self, case: Case):
        if case.name not in self._results:
            ctx = Context(self.saved_run, tempfile.mkdtemp(prefix=case.name + "-", dir=self.root))
            outcome = outcome_of(case.run, ctx)
            self._results[case.name] = (outcome, ctx.lost())
        return self._results[case.name]


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    return Runner(str(tmp_path_factory.mktemp("bad_input")))


def _params(check: str):
    del check  # every check runs for every case
    return [pytest.param(c, id=c.name) for c in CASES]


@pytest.mark.parametrize("case", _params("message"))
def test_message(runner, case):
    outcome, _ = runner.result(case)
    assert case.phrase in outcome.message, outcome


@pytest.mark.parametrize("case", _params("outcome"))
def test_outcome(runner, case):
    outcome, _ = runner.result(case)
    assert outcome.kind == case.kind, outcome


@pytest.mark.parametrize("case", _params("kept"))
def test_nothing_saved_is_lost(runner, case):
    _, lost = runner.result(case)
    assert not lost, f"files changed in {lost}"


def test_there_are_at_least_twenty_cases():
    assert len(CASES) >= 20 and len({c.name for c in CASES}) == len(CASES)


# --------------------------------------------------------------------------- the table


def markdown_table(runner: Runner) -> str:
    rows = ["| # | case | input | outcome | exact message | test |", "|---|---|---|---|---|---|"]
    for i, case in enumerate(CASES, 1):
        outcome, lost = runner.result(case)
        status = outcome.kind + (" (saved files changed!)" if lost else "")
        message = re.sub(re.escape(runner.root) + r"/[\w.-]+", "<tmp>", outcome.message)  # scratch dirs
        message = message.replace("|", "\\|").replace("\n", " ")
        rows.append(f"| {i} | {case.case} | `{case.given}` | {status} | {message} | "
                    f"`tests/test_bad_input.py::*[{case.name}]` |")
    return "\n".join(rows)


HEADER = """# Bad input

Generated by `.venv/bin/python tests/test_bad_input.py > docs/BAD_INPUT.md` from real runs
(the message column is what the code printed, not typed by hand). Each row is three tests in
`tests/test_bad_input.py`: `test_message[name]` (the key phrase), `test_outcome[name]`
(exception type, or CLI exit status; "+ traceback" means one was printed) and
`test_nothing_saved_is_lost[name]` (the finished run the case was pointed at is byte-identical
afterwards; a fresh workdir stays without files). In-process cases call `clrjax.train.train`
on a copy of a finished run unless the input says otherwise.

Every program of `experiments/` ends an expected failure with one line on stderr and an exit
status (`clrjax/cli.py`); an in-process `ConfigError`/`DataError` is exit 3 on the command line:

| exit | meaning |
|---|---|
| 0 | done |
| 1 | unexpected error (a traceback: a bug, please report it) |
| 3 | bad input: flags, config, data, workdir, checkpoint or output directory, found before anything is compiled (program flags before anything is loaded) |
| 4 | non-finite values stopped training (`config.nonfinite`) |
| 5 | a checkpoint could not be written |
| 6 | a result file could not be written after the work was done (disk full, directory removed meanwhile) |
| 75 | stopped by SIGTERM/preemption after saving (`EX_TEMPFAIL`): re-run to resume |

"""

RANGES = """

## Field ranges

`clrjax.config.validate_config` checks every field against this table (`FIELD_SPECS`, and
`LOSS_SPECS` for `config.loss`) before anything is loaded or compiled; `tests/test_config_fuzz.py`
checks that it covers `base_config` and draws wrong types, zeros, negatives, huge and empty values
for every field. Integers are never bools, numbers are finite (and, as they reach the device,
integers fit int32 and floats float32), tuples may be lists (config.json). The upper bounds of
counts and sizes are sanity bounds far beyond any published setting (`MAX_COUNT`: the int32 step
counter and example indices; `MAX_BATCH`, `MAX_WIDTH`, `MAX_SIDE`, `MAX_EPOCHS` in
`clrjax/config.py`); a value inside them still has to fit the machine: a batch, width or crop that
runs out of device memory fails when the step is compiled, and a huge but valid `num_steps` is a
long run, not a hang. `config.model` is checked by the encoder (`clrjax/models`), plus the width
bound on its numbers; what depends on the data (split names of TFDS and folder datasets, files
present, channels) is checked when `build_experiment` opens the training and evaluation splits,
before anything is compiled. Program flags (`--stop_after_steps`, `--step`, `--out`, `--ks`, ...)
are checked at the start of each program.

"""


def ranges_table() -> str:
    rows = ["| field | accepts |", "|---|---|"]
    rows += [f"| `{field}` | {spec.summary()} |" for field, spec in config_lib.FIELD_SPECS.items()]
    rows += [f"| `loss.{name}` | {spec.summary()} |" for name, spec in config_lib.LOSS_SPECS.items()]
    return "\n".join(rows)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="clrjax-bad-input-") as root:
        with contextlib.redirect_stdout(sys.stderr):  # progress lines of the runs stay off the table
            table = markdown_table(Runner(root))
        print(HEADER + table + RANGES + ranges_table())
