"""A frozen encoder to evaluate or export, from a pretraining run or from an export.

Two origins, one result (:class:`FrozenEncoder`: the encoder module, its
variables, and the config whose ``dataset``/``augment``/``eval`` fields say
what to evaluate it on):

* :func:`from_workdir` -- a run directory written by ``experiments/train.py``:
  the config is ``<workdir>/config.json`` (or one given explicitly), the
  variables the ``'encoder'`` subtree of ``params`` and ``batch_stats`` of the
  latest (or a chosen) Orbax checkpoint, restored to host memory whatever
  topology wrote it (:meth:`clrjax.checkpoint.Checkpointer.restore_subtree`).
* :func:`from_export` -- a directory (or ``.safetensors`` file) written by
  :func:`clrjax.export.export_encoder`; the model comes from the export, the
  dataset and preprocessing from the training config the export records
  (``export_source.json``) or from a given config, which must agree with the
  export's stored normalisation.

Every check a user can fail (no checkpoint, a config of another architecture,
an unknown split, a directory that is not an export) runs here, before any
feature is extracted or any program compiled, and raises :class:`EvalInputError`
with one sentence naming the problem and the fix. :func:`export_run` writes an
export of a run's encoder, online or (momentum methods) target, and refuses to
replace another run's export (what ``experiments/export.py`` does).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from clrjax import config as config_lib, export as export_lib, metrics as metrics_lib, models, storage
from clrjax.checkpoint import CheckpointDamagedError, Checkpointer, leaf_shapes
from clrjax.data import augment, sources

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
EXPORT_SOURCE_FILE = "export_source.json"
# online: the encoder that is trained (and evaluated); target: the EMA target network of a
# momentum method (BYOL, MoCo), kept in the method state (clrjax/methods/momentum.py).
NETWORKS = ("online", "target")
# What an export directory holds (written by export_encoder and export_run).
EXPORT_FILES = (export_lib.CONFIG_FILE, export_lib.PREPROCESSING_FILE, export_lib.ORBAX_DIR,
                export_lib.SAFETENSORS_FILE, export_lib.TORCHVISION_FILE, export_lib.TIMM_FILE,
                EXPORT_SOURCE_FILE)


class EvalInputError(ValueError):
    """An evaluation or export input is unusable; the message names it and the fix."""


@dataclasses.dataclass
class FrozenEncoder:
    """An encoder in inference mode plus what to evaluate it on.

    Attributes:
      model_cfg: resolved encoder config (:func:`clrjax.models.resolve_model_config`).
      variables: ``{'params', 'batch_stats'}`` of the encoder (host arrays).
      config: ConfigDict; evaluation reads ``dataset``, ``augment``, ``eval``, ``seed``.
      origin: ``'workdir'`` or ``'export'``; ``path`` the directory it came from.
      step: the checkpoint step (None for an export without provenance).
      network: ``'online'`` (the trained encoder) or ``'target'`` (a momentum
        method's EMA target encoder).
    """
    model_cfg: Dict[str, Any]
    variables: Dict[str, Any]
    config: ml_collections.ConfigDict
    origin: str
    path: str
    step: Optional[int]
    network: str = "online"

    @property
    def module(self):
        return models.build_encoder(self.model_cfg)

    def apply_fn(self, preprocess: bool = True):
        """``(variables, images [B, H, W, C]) -> float32 features [B, F]``, the encoder in inference mode.

        With ``preprocess`` the images are uint8 and get
        :func:`clrjax.data.augment.preprocess_eval` (centre crop to
        ``augment.crop_size``, ``/255``, per-channel normalisation), the same
        as the end-of-training evaluation; without, they are float images
        already preprocessed (the augmented linear protocol). Pass
        :attr:`variables`, placed replicated on the mesh
        (:func:`clrjax.parallel.replicate`) for data-parallel extraction.
        """
        module = self.module
        aug_cfg = self.config.augment.to_dict()

        def apply(variables, images):
            x = augment.preprocess_eval(images, aug_cfg) if preprocess else images
            return module.apply(variables, x, train=False)
        return apply


# --------------------------------------------------------------------------- configs


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a run saved in ``<workdir>/config.json``."""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.isfile(path):
        raise EvalInputError(
            f"{storage.absolute(workdir)} has no {CONFIG_FILE}, so it is not a pretraining run directory; "
            "pass the --workdir given to experiments/train.py, or --config with --encoder=EXPORT_DIR.")
    return config_lib.upgrade_saved_config(json.loads(storage.read_text(path)))


def check_config(config) -> ml_collections.ConfigDict:
    """Validates a user-given config (unknown keys, names) as training does; returns an unlocked copy."""
    try:
        config_lib.validate_config(config)
    except config_lib.ConfigError as err:
        raise EvalInputError(f"config error: {err}") from None
    return ml_collections.ConfigDict(config.to_dict())


def load_split(config, field: str):
    """The source of ``config.dataset.<field>`` (``train_split``/``test_split``); names the valid splits."""
    split = config.dataset[field]
    try:
        return sources.load_source(config.dataset.to_dict(), split)
    except ValueError as err:  # an unknown split or dataset: the message lists the valid ones
        raise EvalInputError(
            f"config.dataset.{field} is {split!r}, which {config.dataset.name} cannot load ({err}); "
            f"set --config.dataset.{field} to one of its splits.") from None
    except sources.DataError as err:
        raise EvalInputError(f"config.dataset.{field}={split!r}: {err}") from None


def load_splits(config) -> Tuple[Any, Any]:
    """(train source, test source), both checked before any compute."""
    return load_split(config, "train_split"), load_split(config, "test_split")


# --------------------------------------------------------------------------- checks


def model_input_shape(config) -> Tuple[int, int, int]:
    """(S, S, C): the crop size and the dataset's channel count (no data is read)."""
    (_, _, channels), _ = sources.dataset_info(config.dataset.to_dict())
    crop = int(config.augment.crop_size)
    return (crop, crop, channels)


def expected_variable_shapes(model_cfg: Mapping, input_shape: Sequence[int]) -> Dict[str, Tuple[int, ...]]:
    """``{'params/conv_0/kernel': shape, ...}`` the encoder has for this input (traced, not run)."""
    module = models.build_encoder(model_cfg)
    dummy = jax.ShapeDtypeStruct((1,) + tuple(input_shape), np.float32)
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), dummy)
    return leaf_shapes(dict(shapes), sep="/")


def check_variables_fit(model_cfg: Mapping, variables: Mapping, input_shape: Sequence[int], what: str) -> None:
    """Raises unless ``variables`` have exactly the names and shapes the encoder expects.

    ``what`` names where the variables came from and where the model config
    came from, for the message (e.g. a ``--config`` of another architecture
    than the checkpoint's, or an export evaluated on images with another
    channel count).
    """
    models.check_input_size(model_cfg, tuple(input_shape[:2]))
    expected = expected_variable_shapes(model_cfg, input_shape)
    got = leaf_shapes(dict(variables), sep="/")
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    # Kernels first: their shapes say most about the architecture (widths, channels).
    wrong = sorted((k for k in set(expected) & set(got) if expected[k] != got[k]),
                   key=lambda k: (not k.endswith("kernel"), k))
    name = model_cfg.get("name")
    if wrong:
        k = wrong[0]
        problem = f"{k} has shape {got[k]} but {name} {_arch_summary(model_cfg)} on {tuple(input_shape)} inputs expects {expected[k]}"
    elif missing or extra:
        problem = (f"its variables {'lack ' + missing[0] if missing else 'have an extra ' + extra[0]}, "
                   f"which {name} {_arch_summary(model_cfg)} {'needs' if missing else 'does not have'}")
    else:
        return
    n = len(wrong) + len(missing) + len(extra)
    more = f" ({n - 1} more mismatches)" if n > 1 else ""
    raise EvalInputError(f"{what}: {problem}{more}; use the config the encoder was trained with.")


def _arch_summary(model_cfg: Mapping) -> str:
    fields = {k: v for k, v in model_cfg.items() if k not in ("name", "dtype")}
    return "(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"


# --------------------------------------------------------------------------- from a run


def checkpoint_step(workdir: str, step: Optional[int] = None) -> Tuple[Checkpointer, int]:
    """(checkpointer, step): the latest step, or ``step`` if it exists; clear errors otherwise.

    The directory is checked before an Orbax manager is created (which would create it).
    """
    directory = storage.join(storage.absolute(workdir), CHECKPOINT_DIR)
    hint = ("train first with `python experiments/train.py --config=configs/<method>.py:<preset> "
            f"--workdir={workdir}`")
    if not storage.isdir(directory) or not any(n.isdigit() for n in storage.listdir(directory)):
        raise EvalInputError(f"no checkpoint in {directory}; {hint}.")
    checkpointer = Checkpointer(directory, every_steps=1, keep=1_000_000, async_save=False)
    steps = sorted(checkpointer.all_steps())
    if not steps or (step is not None and step not in steps):
        checkpointer.close()
    if not steps:
        raise EvalInputError(f"no complete checkpoint in {directory}; {hint}.")
    if step is None:
        return checkpointer, steps[-1]
    if step not in steps:
        raise EvalInputError(f"{directory} has no checkpoint of step {step}; it has steps "
                             f"{', '.join(map(str, steps))}: pass one of them (or omit --step for the latest).")
    return checkpointer, int(step)


# The TrainState entries that hold the encoder; evaluation reads these alone.
ENCODER_STATE_KEYS = ("params", "batch_stats")


def encoder_of_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """The encoder variables ``{'params', 'batch_stats'}`` of a restored TrainState tree."""
    if "params" not in state:
        raise EvalInputError("the checkpoint holds no 'params'; it was not written by experiments/train.py.")
    variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
    return models.encoder_variables({k: v for k, v in variables.items() if v})


def target_encoder_of_state(state: Mapping[str, Any], method: str) -> Dict[str, Any]:
    """The EMA target's encoder variables from a restored ``{'method_state': ...}`` tree.

    A momentum method keeps ``method_state['target'] = {'params': {'encoder',
    'projector'}, 'batch_stats': {...}}`` (:mod:`clrjax.methods.momentum`).
    """
    target = (state.get("method_state") or {}).get("target") or {}
    if "encoder" not in (target.get("params") or {}):
        raise EvalInputError(
            f"--network=target: this {method} run keeps no target network (only the momentum methods, "
            "such as byol, moco_v2 and moco_v3, do); export its online encoder (drop --network).")
    return models.encoder_variables({k: v for k, v in target.items() if v})


def from_workdir(workdir: str, config=None, step: Optional[int] = None,
                 check_splits: bool = True, network: str = "online") -> FrozenEncoder:
    """The encoder of a pretraining run's checkpoint (latest unless ``step``).

    ``config`` (a ConfigDict, e.g. ``--config``) replaces the run's
    ``config.json``; its model must match the checkpoint's shapes. Checks,
    in order: the checkpoint's presence, the config, the splits
    (``check_splits``), then the architecture against the restored variables.
    ``network='target'`` reads a momentum method's EMA target encoder from
    the method state instead of the online encoder.
    """
    if network not in NETWORKS:
        raise EvalInputError(f"--network={network!r} is unknown; use online (the trained encoder, the default) "
                             "or target (the EMA target encoder of a momentum method such as byol).")
    checkpointer, step = checkpoint_step(workdir, step)
    try:
        config = load_run_config(workdir) if config is None else check_config(config)
        if check_splits:
            load_splits(config)
        try:
            model_cfg = models.resolve_model_config(config.model.to_dict())
        except ValueError as err:
            raise EvalInputError(f"config.model is invalid: {err}") from None
        keys = ENCODER_STATE_KEYS if network == "online" else ("method_state",)
        try:
            state = checkpointer.restore_subtree(step, keys=keys)  # verified against its checksums
        except CheckpointDamagedError as err:
            others = ", ".join(str(s) for s in checkpointer.all_steps() if s != step) or "none"
            raise EvalInputError(f"{err} (the run's other steps: {others}; pass one with --step)") from None
    finally:
        checkpointer.close()
    variables = encoder_of_state(state) if network == "online" else target_encoder_of_state(state, config.method)
    check_variables_fit(model_cfg, variables, model_input_shape(config),
                        f"the checkpoint {checkpointer.directory}/{step} does not fit config.model")
    return FrozenEncoder(model_cfg, variables, config, "workdir", storage.absolute(workdir), step, network)


# --------------------------------------------------------------------------- from an export


def check_export_path(path: str) -> None:
    """Raises unless ``path`` is an export directory (with model_config.json) or its .safetensors file."""
    fix = "export a run with `python experiments/export.py --workdir=RUN --out=DIR` and pass that DIR"
    if storage.isfile(path) and path.endswith(".safetensors"):
        return
    if not storage.isdir(path):
        raise EvalInputError(f"--encoder={path} does not exist; {fix}.")
    has_config = storage.isfile(storage.join(path, export_lib.CONFIG_FILE))
    has_safetensors = storage.isfile(storage.join(path, export_lib.SAFETENSORS_FILE))
    if not has_config and not has_safetensors:
        raise EvalInputError(f"{path} has no {export_lib.CONFIG_FILE} (nor {export_lib.SAFETENSORS_FILE}), "
                             f"so it is not an encoder export; {fix}.")


def check_preprocessing(stored: Optional[Mapping[str, Any]], config, path: str) -> None:
    """Raises when the export's stored normalisation/size differs from ``config.augment``."""
    if not stored:
        return
    ours = {"mean": list(config.augment.mean), "std": list(config.augment.std),
            "image_size": int(config.augment.crop_size)}
    for key, value in ours.items():
        if key not in stored:
            continue
        theirs = stored[key]
        same = (np.allclose(np.ravel(theirs).astype(float), np.ravel(value).astype(float))
                if np.size(theirs) == np.size(value) else False)
        if not same:
            field = "crop_size" if key == "image_size" else key
            raise EvalInputError(
                f"the export {path} was trained with {key}={theirs} but config.augment.{field} is {value}; "
                f"pass --config.augment.{field}={tuple(theirs) if isinstance(theirs, list) else theirs} "
                "(the encoder expects its training preprocessing).")


def recorded_config(path: str, provenance: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The training config an export records: ``export_source.json``'s ``config``, else its run's config.json."""
    if provenance.get("config"):
        return config_lib.upgrade_saved_config(provenance["config"])
    workdir = provenance.get("workdir")
    if workdir and storage.isfile(storage.join(workdir, CONFIG_FILE)):  # exports of older clrjax versions
        return load_run_config(workdir)
    why = (f"its run directory {workdir} has no {CONFIG_FILE}" if workdir
           else f"it has no {EXPORT_SOURCE_FILE} naming its training run")
    raise EvalInputError(f"--encoder={path} records no training config ({why}); pass "
                         "--config=configs/<method>.py:<preset> for the dataset and preprocessing.")


def from_export(path: str, config=None, check_splits: bool = True) -> FrozenEncoder:
    """The encoder of an export (:func:`clrjax.export.load_encoder`), evaluated per ``config``.

    Without ``config`` the training config the export records is used
    (:func:`recorded_config`): the run's dataset, splits and preprocessing.
    The encoder computes in the dtype the export records (the run's), as
    :func:`from_workdir` does, so both give the same numbers.
    """
    path = storage.absolute(path)
    check_export_path(path)
    provenance = read_export_source(path)
    config = recorded_config(path, provenance) if config is None else check_config(config)
    if check_splits:
        load_splits(config)
    try:
        loaded = export_lib.load_encoder(path, dtype=None)
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    check_preprocessing(loaded.preprocessing, config, path)
    variables = jax.tree.map(np.asarray, loaded.variables)
    check_variables_fit(loaded.model_cfg, variables, model_input_shape(config),
                        f"the export {path} does not fit config.dataset/config.augment")
    return FrozenEncoder(loaded.model_cfg, variables, config, "export", path, provenance.get("step"),
                         provenance.get("network", "online"))


def read_export_source(path: str) -> Dict[str, Any]:
    """``export_source.json`` (run workdir, step, network, config) of an export made by :func:`export_run`, or {}."""
    directory = path if storage.isdir(path) else storage.dirname(path)
    source = storage.join(directory, EXPORT_SOURCE_FILE)
    if not storage.isfile(source):
        return {}
    return json.loads(storage.read_text(source))


def from_flags(workdir: Optional[str], encoder: Optional[str], config, step: Optional[int]) -> FrozenEncoder:
    """Exactly one of ``workdir``/``encoder``, as the evaluation programs take them."""
    if bool(workdir) == bool(encoder):
        raise EvalInputError("pass exactly one of --workdir=RUN (a pretraining run) or "
                             "--encoder=EXPORT_DIR (an export made by experiments/export.py).")
    if workdir:
        return from_workdir(workdir, config, step)
    if step is not None:
        raise EvalInputError("--step selects a checkpoint of --workdir; an export has one encoder, drop --step.")
    return from_export(encoder, config)


def output_dir(encoder: FrozenEncoder, out: Optional[str]) -> str:
    """Where results go: ``out`` if given, else the run directory or the export directory."""
    if out:
        return out
    return encoder.path if storage.isdir(encoder.path) else storage.dirname(encoder.path)


# --------------------------------------------------------------------------- export


def preprocessing_of(config) -> Dict[str, Any]:
    """What an exported encoder expects: pixels /255, centre crop to image_size, (x - mean) / std."""
    return {"mean": [float(v) for v in config.augment.mean], "std": [float(v) for v in config.augment.std],
            "image_size": int(config.augment.crop_size)}


def export_formats(model_cfg: Mapping, requested: Optional[Sequence[str]]) -> Tuple[Tuple[str, ...], list]:
    """(formats to write, notes): the default skips 'torch' where it cannot be written, an explicit request fails.

    ``requested=None`` means the default (every format). 'torch' needs
    PyTorch and a ResNet or ViT (cnn_small has no torch counterpart).
    """
    explicit = requested is not None
    formats = tuple(requested) if explicit else export_lib.FORMATS
    unknown = [f for f in formats if f not in export_lib.FORMATS]
    if unknown:
        raise EvalInputError(f"--formats has {unknown[0]!r}; use any of {', '.join(export_lib.FORMATS)}.")
    notes = []
    if "torch" in formats:
        reason = None
        if not model_cfg["name"].startswith(("resnet", "vit")):
            reason = f"{model_cfg['name']} has no torchvision/timm counterpart"
        elif importlib.util.find_spec("torch") is None:
            reason = "PyTorch is not installed (`pip install torch`)"
        if reason and explicit:
            raise EvalInputError(f"--formats asks for 'torch' but {reason}; drop torch from --formats.")
        if reason:
            formats = tuple(f for f in formats if f != "torch")
            notes.append(f"skipped the torch format: {reason}.")
    return formats, notes


def _describe_export(source: Mapping[str, Any], name_network: bool = False) -> str:
    if not source.get("workdir"):
        return f"an encoder export of unknown origin (no {EXPORT_SOURCE_FILE})"
    network = source.get("network", "online")
    network = f" ({network} network)" if name_network or network != "online" else ""
    return f"the export of {source['workdir']} step {source.get('step')}{network}"


def prepare_export_dir(out: str, source: Mapping[str, Any], overwrite: bool) -> list:
    """Checks that ``out`` may receive the export of ``source``; returns notes.

    ``out`` may be new, hold no export, or hold an export of the same run and
    network (re-exporting is idempotent; another step of the run replaces it,
    with a note). An export of another run or network, or one of unknown
    origin, is replaced only with ``overwrite``. Whenever the previous export
    is replaced, its files go first, so no stale format outlives it.
    """
    existing = [name for name in EXPORT_FILES if storage.exists(storage.join(out, name))]
    if not existing:
        return []
    previous = read_export_source(out)
    key = lambda src: (src.get("workdir"), src.get("step"), src.get("network", "online"))
    if key(previous) == key(source):
        return []  # the same export again
    same_run = bool(previous) and key(previous)[::2] == key(source)[::2]
    if not same_run and not overwrite:
        same_workdir = previous.get("workdir") == source["workdir"]
        raise EvalInputError(f"{out} already holds {_describe_export(previous, same_workdir)}; pass --overwrite "
                             "to replace it, or choose another --out.")
    notes = [f"replaced {_describe_export(previous)}" + ("" if same_run else " (--overwrite)") + "."]
    results = [n for n in ("linear_eval.json", "knn_eval.json") if storage.isfile(storage.join(out, n))]
    if results:
        notes.append(f"{', '.join(results)} in {out} describe the replaced export; re-run the evaluation.")
    if jax.process_index() == 0:
        for name in existing:
            target = storage.join(out, name)
            storage.rmtree(target) if storage.isdir(target) else storage.remove(target)
    if jax.process_count() > 1:  # nobody writes before process 0 has removed the old files
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("clrjax_export_dir_prepared")
    return notes


def export_run(workdir: str, out: Optional[str] = None, formats: Optional[Sequence[str]] = None,
               step: Optional[int] = None, network: str = "online",
               overwrite: bool = False) -> Tuple[Dict[str, str], list, FrozenEncoder]:
    """Exports a run's encoder; returns ({format: path}, notes, the encoder).

    Writes :func:`clrjax.export.export_encoder`'s files (default into
    ``<workdir>/export``) with the run's preprocessing, plus
    ``export_source.json`` (workdir, step, network and the run's resolved
    config) so evaluations of the export can name the checkpoint it came from
    and need no ``--config``. ``network='target'`` exports a momentum
    method's EMA target encoder. Refuses (:class:`EvalInputError`) to replace
    another run's export unless ``overwrite`` (:func:`prepare_export_dir`).
    """
    encoder = from_workdir(workdir, None, step, check_splits=False, network=network)
    formats, notes = export_formats(encoder.model_cfg, formats)
    out = storage.absolute(out or storage.join(workdir, "export"))
    source = {"workdir": encoder.path, "step": encoder.step, "network": network}
    notes += prepare_export_dir(out, source, overwrite)
    written = export_lib.export_encoder(out, encoder.model_cfg, encoder.variables, formats=formats,
                                        preprocessing=preprocessing_of(encoder.config))
    if jax.process_index() == 0:
        metrics_lib.write_json_file(storage.join(out, EXPORT_SOURCE_FILE),
                                    dict(source, config=encoder.config.to_dict()))
    for note in notes:
        logging.info("export: %s", note)
    return written, notes, encoder
