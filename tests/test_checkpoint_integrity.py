"""Damaged checkpoints are detected, skipped and reported; failed writes exit 5 promptly.

One finished tiny run (steps 2, 4, 6, with checksums) is trained per module;
each case damages a copy of it the way disks and people do (truncated,
zeroed or bit-flipped array files, lost or edited metadata, an empty step
directory). The newest intact step must be restored, with one warning line
naming the damaged step and what was wrong; with no intact step, one error.
Most cases call the Checkpointer in-process (no training); the CLI cases drive
experiments/train.py: a truncated newest step (the re-run warns once, resumes
from the step before and ends bit-identical to the uninterrupted run), no
intact step (exit 3, one line), an unwritable checkpoints directory (exit 5
within seconds of the message, a few lines in all).
"""
import ctypes
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import pytest

from clrjax import checkpoint as ckpt_lib
from clrjax import config as config_lib
from clrjax import parallel, train
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One config for the in-process and the CLI runs: the same programs, so the compilation cache serves all.
OVERRIDES = {
    "model.widths": (8, 16, 16, 16), "projector.hidden_dims": (32,), "projector.out_dim": 16,
    "batch_size": 32, "num_steps": 6, "log_every_steps": 2, "checkpoint.every_steps": 2,
    "checkpoint.async_save": False, "eval.final": False,
    "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0,
}


# One device, in-process and in the CLI runs: 8 simulated devices on 2 cores compile and step slower.
ONE_DEVICE_ENV = dict(os.environ, XLA_FLAGS=xla_flags(1))


def one_device_mesh():
    return parallel.make_mesh(jax.devices()[:1])


def tiny_config(**changes):
    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":digits")
    return config_lib.apply_overrides(config, {**OVERRIDES, **changes})


def cli(workdir, **changes):
    flags = [f"--config.{k}={'(' + ','.join(map(str, v)) + ',)' if isinstance(v, tuple) else v}"
             for k, v in {**OVERRIDES, **changes}.items()]
    return [sys.executable, os.path.join(ROOT, "experiments", "train.py"),
            "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits", f"--workdir={workdir}", *flags]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(workdir of a finished run with steps 2, 4, 6; {step: checksums of its saved state}).

    Trained by the CLI, whose compiled programs the later CLI runs of this module find in the
    compilation cache (in-process programs differ: the test process simulates 8 devices)."""
    workdir = str(tmp_path_factory.mktemp("integrity") / "run")
    run = subprocess.run(cli(workdir), cwd=ROOT, env=ONE_DEVICE_ENV, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=2, keep=3)
    assert checkpointer.all_steps() == [2, 4, 6]
    sums = {s: ckpt_lib.array_checksums(checkpointer.restore_subtree(s)) for s in (4, 6)}
    checkpointer.close()
    return workdir, sums


@pytest.fixture(scope="module")
def abstract_state():
    return ckpt_lib.abstract_like(train.init_train_state(train.build_experiment(tiny_config(), one_device_mesh())))


def copy_run(finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(finished[0], workdir)
    return workdir


# --------------------------------------------------------------------------- ways to damage a step


def _array_files(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "ocdbt.process_*", "d", "*"))
    assert files
    return files


def truncate_arrays(step_dir):
    for path in _array_files(step_dir):
        os.truncate(path, os.path.getsize(path) // 2)


def zero_arrays(step_dir):
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            f.write(bytes(os.path.getsize(path)))


def flip_bytes(step_dir):
    for path in _array_files(step_dir):
        with open(path, "r+b") as f:
            data = bytearray(f.read())
            for i in (len(data) // 3, len(data) // 2, len(data) // 2 + 5):
                data[i] ^= 0x10
            f.seek(0)
            f.write(data)


def delete_array_metadata(step_dir):
    os.remove(os.path.join(step_dir, "state", "_METADATA"))


def corrupt_array_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {')


def delete_manifest(step_dir):
    os.remove(os.path.join(step_dir, "state", "manifest.ocdbt"))


def delete_meta(step_dir):
    os.remove(os.path.join(step_dir, "meta", "metadata"))


def edit_meta(step_dir):
    """Valid JSON with another data position: only the meta checksum can tell."""
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta["data"]["step"] += 1
    with open(path, "w") as f:
        json.dump(meta, f)


def empty_step_directory(step_dir):
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)


DAMAGE = {  # name: (damage, what the warning says)
    "truncated_array_files": (truncate_arrays, "its arrays cannot be read (ValueError: OUT_OF_RANGE"),
    "zeroed_array_files": (zero_arrays, "its arrays cannot be read"),
    # Flipped bits inside compressed chunks decode to other values, or fail to decode.
    "flipped_bytes": (flip_bytes, ("checksum mismatch in", "its arrays cannot be read")),
    "deleted_array_metadata": (delete_array_metadata, "its array metadata"),
    "corrupt_array_metadata": (corrupt_array_metadata, "its array metadata"),
    "deleted_ocdbt_manifest": (delete_manifest, "its array metadata"),
    "deleted_meta": (delete_meta, "its meta item cannot be read"),
    "edited_meta": (edit_meta, "its meta item does not match its checksum"),
    "empty_step_directory": (empty_step_directory, "the step directory is empty"),
}


# --------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_step_is_moved_aside_and_the_previous_one_restored(finished, abstract_state, tmp_path, case):
    damage, reason = DAMAGE[case]
    directory = os.path.join(copy_run(finished, tmp_path), "checkpoints")
    damage(os.path.join(directory, "6"))
    warnings = []
    checkpointer = ckpt_lib.Checkpointer(directory, every_steps=2, keep=3)
    restored = checkpointer.restore_newest_intact(abstract_state, warn=warnings.append)
    assert restored.step == 4
    assert ckpt_lib.array_checksums(restored.state) == finished[1][4]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith(f"checkpoint step 6 in {directory} is damaged (")
    assert warnings[0].endswith("; moved it to 6.damaged; falling back to step 4")
    assert any(r in warnings[0] for r in ((reason,) if isinstance(reason, str) else reason)), warnings[0]
    # Kept for forensics under a name Orbax does not list: the run's next save of step 6 is a fresh one.
    assert sorted(os.listdir(directory)) == ["2", "4", "6.damaged"] and checkpointer.all_steps() == [2, 4]
    checkpointer.close()


def test_no_intact_step_is_one_error_and_nothing_is_moved(finished, tmp_path):
    workdir = copy_run(finished, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    for step in ("2", "4", "6"):
        truncate_arrays(os.path.join(directory, step))
    with pytest.raises(ckpt_lib.NoIntactCheckpointError) as err:
        train.train(tiny_config(), workdir, mesh=one_device_mesh())
    message = str(err.value)
    assert message.startswith(f"no checkpoint in {directory} is intact (step 6: its arrays cannot be read")
    assert "move the damaged step directories out of it" in message and "\n" not in message
    # Every re-run fails the same way until someone decides: nothing is renamed or trained over.
    assert sorted(os.listdir(directory)) == ["2", "4", "6"]


def _misrecord(step_dir, leaf):
    """The bytes on disk no longer match the record of ``leaf`` (as if they had changed)."""
    path = os.path.join(step_dir, "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    meta[ckpt_lib.INTEGRITY_KEY]["arrays"][leaf]["crc32"] = "00000000"
    with open(path, "w") as f:
        json.dump(meta, f)


def test_evaluation_restores_verify_what_they_read(finished, tmp_path):
    from clrjax.evaluation import restore

    workdir = copy_run(finished, tmp_path)
    directory = os.path.join(workdir, "checkpoints")
    _misrecord(os.path.join(directory, "6"), "params.encoder.conv_0.kernel")
    checkpointer = ckpt_lib.Checkpointer(directory, every_steps=2, keep=3)
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match=r"the checkpoint of step 6 in .* is damaged "
                       r"\(checksum mismatch in params.encoder.conv_0.kernel\)"):
        checkpointer.restore_subtree(6, keys=("params", "batch_stats"))
    assert ckpt_lib.array_checksums(checkpointer.restore_subtree(4)) == finished[1][4]
    checkpointer.close()
    # Evaluation never renames anything; it names the other steps to pick.
    zero_arrays(os.path.join(directory, "6"))
    with pytest.raises(restore.EvalInputError, match=r"step 6 .* is damaged \(its arrays cannot be read .*"
                       r"other steps: 2, 4; pass one with --step"):
        restore.from_workdir(workdir, check_splits=False)
    assert sorted(os.listdir(directory)) == ["2", "4", "6"]


def test_a_checkpoint_without_checksums_loads_with_a_warning(finished, abstract_state, tmp_path, caplog):
    """Written before checksums were recorded: refusing it would strand every run at upgrade."""
    directory = os.path.join(copy_run(finished, tmp_path), "checkpoints")
    path = os.path.join(directory, "6", "meta", "metadata")
    with open(path) as f:
        meta = json.load(f)
    del meta[ckpt_lib.INTEGRITY_KEY]
    with open(path, "w") as f:
        json.dump(meta, f)
    checkpointer = ckpt_lib.Checkpointer(directory, every_steps=2, keep=3)
    with caplog.at_level("WARNING"):
        restored = checkpointer.restore_newest_intact(abstract_state)
    checkpointer.close()
    assert restored.step == 6 and ckpt_lib.array_checksums(restored.state) == finished[1][6]
    assert [r.getMessage() for r in caplog.records if "has no checksums" in r.getMessage()] == [
        f"checkpoint step 6 in {directory} has no checksums (written before clrjax recorded them): loaded "
        "after structure, readability and finiteness checks only"]


# --------------------------------------------------------------------------- the CLI


def _stderr_lines(proc):
    return [ln for ln in proc.stderr.splitlines() if ln.strip()]


def test_cli_falls_back_past_a_truncated_step_and_exits_3_when_none_is_intact(finished, tmp_path):
    fallback, none_intact = str(tmp_path / "fallback"), str(tmp_path / "none_intact")
    for workdir in (fallback, none_intact):
        shutil.copytree(finished[0], workdir)
    truncate_arrays(os.path.join(fallback, "checkpoints", "6"))
    for step in ("2", "4", "6"):
        truncate_arrays(os.path.join(none_intact, "checkpoints", step))
    procs = [subprocess.Popen(cli(w), cwd=ROOT, env=ONE_DEVICE_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for w in (fallback, none_intact)]  # concurrent: most of their time is start-up
    (out, err), (_, err_none) = [p.communicate(timeout=600) for p in procs]
    assert procs[0].returncode == 0, err[-3000:]
    damaged = [ln for ln in err.splitlines() if "is damaged" in ln]
    assert len(damaged) == 1, damaged
    assert re.search(r"\] checkpoint step 6 in " + re.escape(os.path.join(fallback, "checkpoints")) +
                     r" is damaged \(its arrays cannot be read \(ValueError: OUT_OF_RANGE: Error reading \"[^\"]+\": "
                     r"Requested byte range .*\)\); moved it to 6.damaged; falling back to step 4$", damaged[0]), damaged
    assert "Resumed from step 4" in out
    assert sorted(os.listdir(os.path.join(fallback, "checkpoints"))) == ["2", "4", "6", "6.damaged"]
    # ... and trains on to the uninterrupted run's state, bit for bit.
    checkpointer = ckpt_lib.Checkpointer(os.path.join(fallback, "checkpoints"), every_steps=2, keep=3)
    assert ckpt_lib.array_checksums(checkpointer.restore_subtree(6)) == finished[1][6]
    checkpointer.close()

    assert procs[1].returncode == 3, err_none[-3000:]
    lines = [ln for ln in err_none.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("[process 0] checkpoint error: no checkpoint in "), lines[0]


def _drop_dac_override():
    """preexec_fn: without CAP_DAC_OVERRIDE root obeys permission bits too (PR_CAPBSET_DROP, then exec)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def test_an_unwritable_checkpoints_directory_exits_5_promptly_with_a_short_message(tmp_path):
    """Orbax's threads of the failed save waited 300 s at interpreter shutdown, and its
    tracebacks buried the message (read-only directory: 267 lines; disk full: 275)."""
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "checkpoints").chmod(0o555)
    command = cli(str(workdir), **{"checkpoint.async_save": True}) + ["--stop_after_steps=2"]
    proc = subprocess.Popen(command, cwd=ROOT, env=ONE_DEVICE_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)
    lines, said = [], None
    for line in proc.stderr:
        lines.append(line.rstrip("\n"))
        if said is None and "stopped: writing the checkpoint" in line:
            said = time.monotonic()
    proc.wait(timeout=600)
    exited = time.monotonic()
    proc.stderr.close()
    assert proc.returncode == 5, "\n".join(lines[-40:])
    assert said is not None and exited - said < 10, f"exited {exited - said:.0f}s after the message"
    assert len(lines) <= 6, "\n".join(lines)
    assert lines[-1].startswith("[process 0] stopped: writing the checkpoint of step 2 to "), lines[-1]
    assert "Permission denied" in lines[-1] and "There is no earlier checkpoint" in lines[-1]
