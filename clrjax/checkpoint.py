"""Orbax checkpoints of the whole train state, resumable on any mesh.

A checkpoint step directory holds two items:
  * ``state``: the TrainState pytree (params, batch statistics, optimizer
    state, method state such as TiCo's covariance, step, RNG), written
    cooperatively by all processes (``StandardSave``);
  * ``meta``: JSON with the data-loader position and the run's identity.
Orbax writes each step into a temporary directory and renames it when it is
complete, so a step directory that exists is complete; leftovers of an
interrupted save are never listed as steps (found in ``leftovers``).
Restoring takes an abstract state whose leaves carry the *target* shardings,
so a checkpoint written on one device/process count resumes on another.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Optional, Sequence, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

TMP_MARKER = ".orbax-checkpoint-tmp"
# Reading the 'state' item directly (not through the CheckpointManager) makes Orbax
# look for step metadata inside the item, where it never is: it lives one level up.
_ITEM_METADATA_WARNING = "Metadata file does not exist"


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


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; training stops rather than run unsaved."""


class CheckpointMismatchError(ValueError):
    """The saved state's structure or shapes differ from the state this run builds."""


def _path_name(path, sep: str) -> str:
    return sep.join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def leaf_shapes(tree, sep: str = ".") -> dict:
    """``{'params<sep>conv_0<sep>kernel': shape, ...}`` of arrays, ShapeDtypeStructs or Orbax metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {_path_name(p, sep): tuple(x.shape) for p, x in leaves}


class Checkpointer:
    """Saves every ``every_steps`` steps (and when forced), keeps ``keep``."""

    def __init__(self, directory: str, *, every_steps: int, keep: int, async_save: bool = True):
        self.directory = os.path.abspath(directory)
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
        if not os.path.isdir(self.directory):
            return []
        return sorted(n for n in os.listdir(self.directory) if TMP_MARKER in n)

    def should_save(self, step: int) -> bool:
        return self._manager.should_save(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process got a preemption notice (multi-host sync point)."""
        return self._manager.reached_preemption(step)

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts a (possibly async) save; returns whether one was started.

        Orbax first waits for the previous background save, so its failure
        surfaces here; the error then names both steps.
        """
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

    def restore(self, step: int, abstract_state: Any) -> Tuple[Any, dict]:
        """Restores ``step`` onto the shardings held by ``abstract_state``'s leaves."""
        self._check_fits(step, abstract_state)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                    meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def _saved_tree(self, step: int):
        with _quiet_item_metadata_warning():
            metadata = ocp.StandardCheckpointer().metadata(os.path.join(self.directory, str(step), "state"))
        return getattr(getattr(metadata, "item_metadata", metadata), "tree", metadata)

    def _check_fits(self, step: int, abstract_state) -> None:
        """Names the leaves whose presence or shape differ, before Orbax fails obscurely."""
        saved, wanted = leaf_shapes(self._saved_tree(step)), leaf_shapes(abstract_state)
        problems = [f"{k}: absent from the checkpoint" if k not in saved else
                    f"{k}: shape {saved[k]} in the checkpoint, {wanted[k]} now"
                    for k in wanted if saved.get(k) != wanted[k]]
        problems += [f"{k}: in the checkpoint but not in this run" for k in saved if k not in wanted]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointMismatchError(
                f"the checkpoint of step {step} in {self.directory} does not fit this run's train state "
                f"({'; '.join(problems[:3])}{more})")

    def restore_subtree(self, step: int, keys: Optional[Sequence[str]] = None) -> Any:
        """The saved state, or its top-level ``keys`` alone, as host numpy arrays (eval, export).

        Works whatever topology wrote the checkpoint: Orbax refuses a
        target-less restore when the writer's devices differ from ours, so the
        target is built from the checkpoint's own metadata and placed on one
        local device. With ``keys`` (e.g. ``('params', 'batch_stats')``) the
        other entries, such as the optimizer state (2x the parameters for
        Adam/LARS), are not read at all (Orbax ``partial_restore``); a key the
        checkpoint lacks is left out of the result.
        """
        saved = self._saved_tree(step)
        if keys is not None:  # an empty entry (a ViT's batch_stats) may be absent from the metadata
            saved = {k: saved[k] for k in keys if k in saved}
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
        path = os.path.join(self.directory, str(step), "state")
        args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                      partial_restore=keys is not None)
        with _quiet_item_metadata_warning():
            restored = ocp.PyTreeCheckpointer().restore(path, args=args)
        return jax.tree.map(np.asarray, restored)

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
        return CheckpointWriteError(
            f"writing the checkpoint of step {which}{background} to {self.directory} failed "
            f"({type(err).__name__}: {err}); training stopped so that no progress goes unsaved. Earlier "
            f"checkpoints are intact (steps {intact}). Free disk space or fix permissions, then re-run the "
            "same command.")

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the leaves' shardings: the restore target for ``tree``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
