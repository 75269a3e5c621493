"""Orbax checkpoints of the whole train state, verified on restore, resumable on any mesh.

A checkpoint step directory holds two items:
  * ``state``: the TrainState pytree (params, batch statistics, optimizer
    state, method state such as TiCo's covariance, step, RNG), written
    cooperatively by all processes (``StandardSave``);
  * ``meta``: JSON with the data-loader position, the run's identity and the
    step's integrity record (below).
Orbax writes each step into a temporary directory and renames it when it is
complete, so a step directory that exists was complete when written; leftovers
of an interrupted save are never listed as steps (found in ``leftovers``).
Restoring takes an abstract state whose leaves carry the *target* shardings,
so a checkpoint written on one device/process count resumes on another.

Integrity (docs/FAULTS.md). A complete step can still be damaged later (a
truncated or zeroed file, a lost metadata file, flipped bits), and neither
Orbax nor TensorStore notices every such case: a few flipped bytes in an
array file load silently. So every save records, in the ``meta`` item written
by the same Orbax save (hence committed atomically with the arrays), a CRC32
of each array's bytes, computed from the host copy of exactly the values
being saved, plus a CRC32 of the rest of ``meta``. Every restore
(:meth:`Checkpointer.restore`, :meth:`Checkpointer.restore_subtree`) reads
the arrays, recomputes the checksums and compares them before returning
anything; any read error, missing part or mismatch raises
:class:`CheckpointDamagedError` naming what was wrong. Nothing unverified is
returned, except for checkpoints written before checksums were recorded
(their ``meta`` has no record): refusing those would strand every run in
flight at upgrade time, so they load after the checks that are possible
without a record (structure, shapes, readable bytes, finite values) with a
one-line warning; the next save of the run is checksummed.

:meth:`Checkpointer.restore_newest_intact` is what training resumes with: it
walks the steps newest first, moves each damaged one aside to
``<step>.damaged`` (kept for forensics; Orbax no longer lists it, so the
run's next save of that step number is not confused with it) and restores the
newest intact step, or raises :class:`NoIntactCheckpointError`.

Multi-process runs: process 0 checksums a host copy of the whole state and
is the one process that writes the ``meta`` JSON; every process verifies the
arrays it restored, and the processes agree (an all-gather) on each step's
verdict so that all of them fall back to the same step. A replicated state is
whole on every process; leaves of an FSDP state (``config.sharding``,
clrjax/state_sharding.py) that span several processes are all-gathered to the
host first, by every process at the same point (``state_sharding.host_copy``),
so the checksums are the same whatever the layout and a checkpoint moves
between replicated and sharded runs and across device counts.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import traceback
import zlib
from typing import Any, Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from clrjax import storage
from clrjax import state_sharding
# Each process reads the files itself; all of them must fall back to the same step.
from clrjax.workdir_lock import all_processes_agree as _agreed

TMP_MARKER = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"
INTEGRITY_KEY = "integrity"
_ALGORITHM = "crc32"
# Reading the 'state' item directly (not through the CheckpointManager) makes Orbax
# look for step metadata inside the item, where it never is: it lives one level up.
_ITEM_METADATA_WARNING = "Metadata file does not exist"
_ORBAX_SOURCE = f"{os.sep}orbax{os.sep}"
_MAX_REASON_CHARS = 160


class _DropItemMetadataWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _ITEM_METADATA_WARNING not in record.getMessage()


@contextlib.contextmanager
def _quiet_item_metadata_warning():
    """Drops that one warning (printed on every evaluation) while an item is read directly."""
    logger, drop = logging.getLogger("absl"), _DropItemMetadataWarning()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class _HoldOrbaxRecords(logging.Filter):
    """Holds back Orbax's log records; :func:`_held_orbax_logs` decides whether to emit them."""

    def __init__(self):
        super().__init__()
        self.records: List[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if _ORBAX_SOURCE not in (record.pathname or ""):
            return True
        if _ITEM_METADATA_WARNING not in record.getMessage():
            self.records.append(record)
        return False


@contextlib.contextmanager
def _held_orbax_logs() -> Iterator[List[bool]]:
    """Orbax's warnings while one step is read, emitted only if the step turns out intact.

    Reading a damaged step makes Orbax log several warnings (missing metadata
    files, ...) besides the exception: the one-line damage warning says all
    of it. The caller appends True to the yielded list when the step is intact.
    """
    logger, hold, intact = logging.getLogger("absl"), _HoldOrbaxRecords(), []
    logger.addFilter(hold)
    try:
        yield intact
    finally:
        logger.removeFilter(hold)
        if intact:
            for record in hold.records:
                logger.handle(record)


class _OneLineOrbaxErrors(logging.Filter):
    """Orbax's background threads log every failed write with a full traceback, once per
    thread (a read-only or full disk printed 188-383 lines before clrjax's own one-line
    message). The exception that reaches :class:`CheckpointWriteError` carries the cause, so
    Orbax's records keep their first line; ``--verbosity=1`` (DEBUG) keeps the tracebacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _ORBAX_SOURCE in (record.pathname or "") and logging.getLogger("absl").getEffectiveLevel() > logging.DEBUG:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
            message = record.getMessage().splitlines()
            record.msg, record.args = (message[0] if message else ""), None
        return True


_ONE_LINE_ORBAX_ERRORS = _OneLineOrbaxErrors()


def _is_abandoned_loop_callback(exc_type, exc, tb) -> bool:
    """TensorStore completing a write into the asyncio loop that Orbax closed when the save
    failed: ``RuntimeError: Event loop is closed`` in ``call_soon_threadsafe``, printed with a
    traceback per pending write (270 lines of a full disk). Nothing is lost by dropping it."""
    return (exc_type is RuntimeError and str(exc) == "Event loop is closed"
            and any(frame.f_code.co_name == "call_soon_threadsafe" for frame, _ in traceback.walk_tb(tb)))


def _quiet_excepthook(previous):
    def hook(exc_type, exc, tb):
        if not _is_abandoned_loop_callback(exc_type, exc, tb):
            previous(exc_type, exc, tb)
    hook.clrjax_quiet = True
    return hook


def _is_abandoned_orbax_coroutine(unraisable) -> bool:
    """An Orbax coroutine of a failed read or write, finalised with its error still inside (a
    damaged step printed one 60-line TensorStore dump per array). The error already surfaced
    from the call that awaited the work; this is its echo."""
    code = getattr(unraisable.object, "cr_code", None)
    return code is not None and _ORBAX_SOURCE in code.co_filename


def _quiet_unraisablehook(previous):
    def hook(unraisable):
        if not (_is_abandoned_loop_callback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
                or _is_abandoned_orbax_coroutine(unraisable)):
            previous(unraisable)
    hook.clrjax_quiet = True
    return hook


def _install_quiet_failures() -> None:
    """Once per process, never removed (Orbax's threads of a failed save report long after):
    Orbax's error records in one line each, and no tracebacks of its abandoned event loops
    and coroutines."""
    logger = logging.getLogger("absl")
    if _ONE_LINE_ORBAX_ERRORS not in logger.filters:
        logger.addFilter(_ONE_LINE_ORBAX_ERRORS)
    if not getattr(sys.excepthook, "clrjax_quiet", False):
        sys.excepthook = _quiet_excepthook(sys.excepthook)
    if not getattr(sys.unraisablehook, "clrjax_quiet", False):
        sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; training stops rather than run unsaved."""


class CheckpointMismatchError(ValueError):
    """The saved state's structure or shapes differ from the state this run builds."""


class CheckpointDamagedError(ValueError):
    """A checkpoint step cannot be trusted: a part is missing or unreadable, or an array's
    bytes differ from the checksum recorded when it was saved."""

    def __init__(self, message: str, step: Optional[int] = None, reason: str = ""):
        super().__init__(message)
        self.step, self.reason = step, reason


class NoIntactCheckpointError(CheckpointDamagedError):
    """Every checkpoint step of a run is damaged, so the run cannot resume."""


class _Damage(Exception):
    """Internal: what is wrong with the step being read (becomes CheckpointDamagedError)."""


class Restored(NamedTuple):
    step: int
    state: Any
    meta: dict


def _path_name(path, sep: str) -> str:
    return sep.join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_shapes(tree, sep: str = ".") -> dict:
    """``{'params<sep>conv_0<sep>kernel': shape, ...}`` of arrays, ShapeDtypeStructs or Orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_name(p, sep): tuple(x.shape) for p, x in leaves}


# --------------------------------------------------------------------------- checksums


def _leaf_crc(value) -> str:
    """CRC32 of an array's bytes in C order (dtype and shape are compared separately)."""
    host = np.ascontiguousarray(np.asarray(value))
    return f"{zlib.crc32(host.reshape(-1).view(np.uint8)):08x}"


def array_checksums(tree) -> dict:
    """``{'params.encoder.conv_0.kernel': {'crc32', 'shape', 'dtype'}, ...}`` of the host values.

    The leaves must be addressable in full by this process: pass a host copy
    (``state_sharding.host_copy``) of a state sharded over several processes.
    """
    host = jax.device_get(tree)
    return {_path_name(p, "."): {"crc32": _leaf_crc(x), "shape": list(np.shape(x)), "dtype": str(np.asarray(x).dtype)}
            for p, x in jax.tree_util.tree_flatten_with_path(host)[0]}


def _json_crc(value) -> str:
    return f"{zlib.crc32(json.dumps(value, sort_keys=True, separators=(',', ':')).encode()):08x}"


def seal_meta(meta: dict, state: Any) -> dict:
    """``meta`` plus the integrity record of ``state`` (see the module docstring)."""
    record = {"algorithm": _ALGORITHM, "arrays": array_checksums(state), "meta_crc32": _json_crc(meta)}
    return dict(meta, **{INTEGRITY_KEY: record})


def _unseal(meta: dict) -> Tuple[dict, Optional[dict]]:
    """(meta without its record, the record or None for a checkpoint older than checksums)."""
    meta = dict(meta)
    record = meta.pop(INTEGRITY_KEY, None)
    if record is None:
        return meta, None
    if not isinstance(record, dict) or record.get("algorithm") != _ALGORITHM or not isinstance(
            record.get("arrays"), dict):
        raise _Damage("its integrity record is malformed")
    if record.get("meta_crc32") != _json_crc(meta):
        raise _Damage("its meta item does not match its checksum")
    return meta, record


def _verify_arrays(tree, record: dict, keys: Optional[Sequence[str]] = None) -> None:
    """Raises _Damage unless every leaf of ``tree`` has the recorded checksum, shape and dtype,
    and (for a full restore) every recorded array was restored."""
    got, want = array_checksums(tree), record["arrays"]
    if keys is not None:
        want = {k: v for k, v in want.items() if k.split(".", 1)[0] in keys}
    unrecorded = sorted(set(got) - set(want))
    if unrecorded:
        raise _Damage(f"no checksum recorded for {unrecorded[0]}")
    absent = sorted(set(want) - set(got))
    if absent:
        raise _Damage(f"{absent[0]} was not restored")
    bad = [k for k in sorted(got) if got[k] != want[k]]
    if bad:
        more = f" and {len(bad) - 1} more arrays" if len(bad) > 1 else ""
        raise _Damage(f"checksum mismatch in {bad[0]}{more}")


def _non_finite_leaf(tree) -> Optional[str]:
    """The first floating-point leaf holding NaN/Inf, if any (never saved by training)."""
    for path, x in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]:
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.all(np.isfinite(x)):
            return _path_name(path, ".")
    return None


def _summary(err: BaseException) -> str:
    """One short line of an exception. Orbax wraps TensorStore's error (the informative one:
    ``OUT_OF_RANGE: Error reading "params.encoder.conv_3.kernel/0.0.7.0" ...``) in 60 lines
    with a spec dump; the innermost cause is kept, without the database's path."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), "")
    text = re.sub(r' in OCDBT database at [^"]*"[^"]*"', "", text.split(". See full TensorStore details")[0])
    text = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text if len(text) <= _MAX_REASON_CHARS else text[:_MAX_REASON_CHARS - 3] + "..."


# --------------------------------------------------------------------------- the checkpointer


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps ``keep``; verifies on restore."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = storage.absolute(directory)  # Orbax wants absolute paths; gs:// stays as it is
        _install_quiet_failures()
        # Scanned before the manager starts, which may clean such leftovers up.
        self.leftovers = self._scan_incomplete()
        # An explicit policy: with only save_interval_steps, Orbax also adds an
        # initial save after the first step, which costs a write and a `keep` slot.
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy([
                policies.FixedIntervalPolicy(every_steps),
                policies.PreemptionCheckpointingPolicy(),
            ]),
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
        )
        with _quiet_item_metadata_warning():  # a damaged step's missing step metadata: reported on restore
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=("state", "meta"))
        self._async = async_save
        self._unconfirmed: Optional[int] = None  # a background save not yet known to have finished

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def _scan_incomplete(self):
        """Names of leftover temporary directories of interrupted saves."""
        if not storage.isdir(self.directory):
            return []
        return sorted(n for n in storage.listdir(self.directory) if TMP_MARKER in n)

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process got a preemption notice (multi-host sync point)."""
        return self._manager.reached_preemption(step)

    # ----------------------------------------------------------------------- save

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts a (possibly async) save; returns whether one was started.

        The checksums are computed first, synchronously, from a host copy of
        ``state`` (a device-to-host copy of the state per save, the same one
        an async save makes): the caller donates the state's buffers to the
        next step as soon as this returns. Only process 0 computes them; it
        alone writes ``meta``. Orbax first waits for the previous background
        save, so its failure surfaces here; the error then names both steps.
        """
        # Asked on every process: with a preemption policy the decision is a multi-host sync point.
        if force or self._manager.should_save(step):
            spans_processes = not all(getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(state))
            if spans_processes or jax.process_index() == 0:
                host = state_sharding.host_copy(state)  # then a collective: every process takes part
                if jax.process_index() == 0:
                    meta = seal_meta(meta, host)
        try:
            started = self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                force=force,
            )
        except Exception as err:  # disk full, permissions, a failed earlier async save...
            earlier = [self._unconfirmed] if self._unconfirmed not in (None, step) else []
            raise self._write_error(earlier + [step], err) from err
        if started and self._async:
            self._unconfirmed = step
        return started

    # ----------------------------------------------------------------------- restore

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """Restores ``step`` onto the shardings held by ``abstract_state``'s leaves, verified.

        Raises CheckpointDamagedError (what was wrong), or CheckpointMismatchError when the
        step is readable but holds another run's state (other method or shapes).
        """
        with self._damage_as_error(step), _held_orbax_logs() as intact:
            meta, record = self._read_meta(step)
            self._check_fits(step, abstract_state, record)
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
            except Exception as err:  # TensorStore/Orbax read errors of damaged files
                raise _Damage(f"its arrays cannot be read ({_summary(err)})") from None
            self._verify(step, state_sharding.host_copy(restored["state"]), record)
            intact.append(True)
        return restored["state"], meta

    def restore_newest_intact(self, abstract_state: Any, *, quarantine: bool = True,
                              warn: Callable[[str], None] = logging.getLogger("absl").warning
                              ) -> Optional[Restored]:
        """The newest step that restores and verifies (None when there is no step at all).

        Damaged newer steps are reported by ``warn`` in one line each and, with
        ``quarantine``, renamed to ``<step>.damaged`` (process 0; the others wait).
        Raises NoIntactCheckpointError when every step is damaged (then nothing
        is renamed: each re-run fails the same way until someone decides) and
        CheckpointMismatchError as :meth:`restore` does.
        """
        damaged: List[Tuple[int, str]] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                state, meta = self.restore(step, abstract_state)
                reason = None
            except CheckpointDamagedError as err:
                reason = err.reason
            if not _agreed(reason is None):
                damaged.append((step, reason or "another process could not verify it"))
                continue
            moved = self._quarantine([s for s, _ in damaged]) if quarantine else {}
            if jax.process_index() == 0:
                for bad, why in damaged:
                    where = f"; moved it to {moved[bad]}" if bad in moved else ""
                    warn(f"checkpoint step {bad} in {self.directory} is damaged ({why}){where}; "
                         f"falling back to step {step}")
            return Restored(step, state, meta)
        if damaged:
            raise self._none_intact(damaged)
        return None

    def restore_subtree(self, step: int, keys: Optional[Sequence[str]] = None) -> Any:
        """The saved state, or its top-level ``keys`` alone, as host numpy arrays (eval, export), verified.

        Works whatever topology wrote the checkpoint: Orbax refuses a
        target-less restore when the writer's devices differ from ours, so the
        target is built from the checkpoint's own metadata and placed on one
        local device. With ``keys`` (e.g. ``('params', 'batch_stats')``) the
        other entries, such as the optimizer state (2x the parameters for
        Adam/LARS), are not read at all (Orbax ``partial_restore``); a key the
        checkpoint lacks is left out of the result. Only what is read is
        verified. Raises CheckpointDamagedError; never renames anything.
        """
        with self._damage_as_error(step), _held_orbax_logs() as intact:
            _, record = self._read_meta(step)
            saved = self._saved_tree(step)
            if keys is not None:  # an empty entry (a ViT's batch_stats) may be absent from the metadata
                saved = {k: saved[k] for k in keys if k in saved}
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
            path = storage.join(self.directory, str(step), "state")
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=keys is not None)
            try:
                with _quiet_item_metadata_warning():
                    restored = jax.tree.map(np.asarray, ocp.PyTreeCheckpointer().restore(path, args=args))
            except Exception as err:
                raise _Damage(f"its arrays cannot be read ({_summary(err)})") from None
            self._verify(step, restored, record, keys)
            intact.append(True)
        return restored

    @contextlib.contextmanager
    def _damage_as_error(self, step: int):
        try:
            yield
        except _Damage as damage:
            reason = str(damage)
            raise CheckpointDamagedError(
                f"the checkpoint of step {step} in {self.directory} is damaged ({reason}); use another "
                "step, or move it out of the directory", step=step, reason=reason) from None

    def _read_meta(self, step: int) -> Tuple[dict, Optional[dict]]:
        """(meta, integrity record or None); raises _Damage for a missing part or an unreadable meta."""
        step_dir = storage.join(self.directory, str(step))
        if not storage.listdir(step_dir):
            raise _Damage("the step directory is empty")
        missing = [item for item in ("state", "meta") if not storage.isdir(storage.join(step_dir, item))]
        if missing:
            raise _Damage(f"its {' and '.join(missing)} item is missing")
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as err:
            raise _Damage(f"its meta item cannot be read ({_summary(err)})") from None
        if not isinstance(meta, dict):
            raise _Damage("its meta item is not a JSON object")
        return _unseal(meta)

    def _verify(self, step: int, tree, record: Optional[dict], keys=None) -> None:
        if record is not None:
            _verify_arrays(tree, record, keys)
            return
        bad = _non_finite_leaf(tree)
        if bad is not None:
            raise _Damage(f"{bad} holds NaN/Inf and the step has no checksums")
        logging.getLogger("absl").warning(
            "checkpoint step %d in %s has no checksums (written before clrjax recorded them): loaded after "
            "structure, readability and finiteness checks only", step, self.directory)

    def _saved_tree(self, step: int):
        try:
            with _quiet_item_metadata_warning():
                metadata = ocp.StandardCheckpointer().metadata(storage.join(self.directory, str(step), "state"))
        except Exception as err:
            raise _Damage(f"its array metadata cannot be read ({_summary(err)})") from None
        tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)
        if not isinstance(tree, dict):  # Orbax returns bare step metadata when state/_METADATA is unusable
            raise _Damage("its array metadata (state/_METADATA or the OCDBT manifest) is missing or unreadable")
        return tree

    def _check_fits(self, step: int, abstract_state, record: Optional[dict] = None) -> None:
        """Names the leaves whose presence or shape differ, before Orbax fails obscurely.

        When the integrity record says the arrays were saved with exactly the
        wanted shapes, a disagreeing Orbax metadata file is damage, not
        another run's checkpoint.
        """
        saved, wanted = leaf_shapes(self._saved_tree(step)), leaf_shapes(abstract_state)
        problems = [f"{k}: absent from the checkpoint" if k not in saved else
                    f"{k}: shape {saved[k]} in the checkpoint, {wanted[k]} now"
                    for k in wanted if saved.get(k) != wanted[k]]
        problems += [f"{k}: in the checkpoint but not in this run" for k in saved if k not in wanted]
        if not problems:
            return
        if record is not None and {k: tuple(v["shape"]) for k, v in record["arrays"].items()} == wanted:
            raise _Damage(f"its array metadata disagrees with its checksum record ({problems[0]})")
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointMismatchError(
            f"the checkpoint of step {step} in {self.directory} does not fit this run's train state "
            f"({'; '.join(problems[:3])}{more})")

    def _quarantine(self, steps: Sequence[int]) -> dict:
        """Renames damaged step directories to ``<step>.damaged[-k]`` (process 0); {step: new name}."""
        if not steps:
            return {}
        moved = {}
        if jax.process_index() == 0:
            for step in steps:
                name = _free_name(self.directory, f"{step}{DAMAGED_SUFFIX}")
                try:
                    storage.rename(storage.join(self.directory, str(step)), storage.join(self.directory, name))
                except OSError as err:
                    raise CheckpointDamagedError(
                        f"the checkpoint of step {step} in {self.directory} is damaged and could not be moved "
                        f"aside ({err.strerror or err}); move it out of the directory and re-run", step=step,
                        reason="could not be moved aside") from None
                moved[step] = name
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("clrjax-checkpoint-quarantine")
        with _quiet_item_metadata_warning():
            self._manager.reload()
        return moved

    def _none_intact(self, damaged: Sequence[Tuple[int, str]]) -> NoIntactCheckpointError:
        listed = "; ".join(f"step {s}: {why}" for s, why in damaged[:3])
        more = f"; and {len(damaged) - 3} more" if len(damaged) > 3 else ""
        return NoIntactCheckpointError(
            f"no checkpoint in {self.directory} is intact ({listed}{more}), so the run cannot resume: move the "
            "damaged step directories out of it to train again from step 0, or use a new --workdir",
            step=damaged[0][0], reason=damaged[0][1])

    # ----------------------------------------------------------------------- wait, errors, close

    def wait(self) -> None:
        """Blocks until any background save has finished (and raises its error, if any)."""
        try:
            self._manager.wait_until_finished()
        except Exception as err:
            raise self._write_error([self._unconfirmed if self._unconfirmed is not None else self.latest_step()],
                                    err) from err
        self._unconfirmed = None

    def _write_error(self, steps, err) -> CheckpointWriteError:
        which = " or ".join(str(s) for s in steps)
        background = " (the earlier one was still being written in the background)" if len(steps) > 1 else ""
        intact = [s for s in self.all_steps() if s not in steps]
        earlier = (f"Earlier checkpoints are intact (steps {intact})" if intact else
                   "There is no earlier checkpoint")
        return CheckpointWriteError(
            f"writing the checkpoint of step {which}{background} to {self.directory} failed "
            f"({_summary(err)}); training stopped so that no progress goes unsaved. "
            f"{earlier}. Free disk space or fix permissions, then re-run the same command.")

    def close(self) -> None:
        self._manager.close()


def _free_name(directory: str, name: str) -> str:
    """``name``, or ``name-1``, ``name-2``... whichever does not exist yet in ``directory``."""
    candidate, k = name, 0
    while storage.exists(storage.join(directory, candidate)):
        k += 1
        candidate = f"{name}-{k}"
    return candidate


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the leaves' shardings: the restore target for ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
