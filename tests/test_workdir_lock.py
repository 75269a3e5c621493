"""One trainer per workdir: a second one is refused by name; a killed one leaves no stuck lock."""
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from clrjax import train, workdir_lock
from tests.test_checkpoint_integrity import ONE_DEVICE_ENV, ROOT, cli, one_device_mesh, tiny_config


def read(path):
    with open(path) as f:
        return f.read()


def alone(ok):
    """The ``agree`` of a one-process run (no JAX collective)."""
    return ok


def test_a_second_trainer_is_refused_with_the_holders_host_and_pid(tmp_path):
    with workdir_lock.WorkdirLock(str(tmp_path), 0, alone):
        with pytest.raises(workdir_lock.WorkdirBusyError) as err:
            workdir_lock.WorkdirLock(str(tmp_path), 0, alone).acquire()
    message = str(err.value)
    assert message.startswith(f"the workdir {tmp_path} is in use by another trainer (host {socket.gethostname()}, "
                              f"pid {os.getpid()}, started ")
    assert message.endswith("); wait for it to finish or stop it, or use another --workdir.")


def test_a_run_that_ends_frees_the_lock_and_empties_its_record(tmp_path):
    lock = workdir_lock.WorkdirLock(str(tmp_path), 0, alone).acquire()
    assert json.loads(read(lock.path))["pid"] == os.getpid()
    lock.release()
    assert read(lock.path) == ""  # a later failing invocation leaves a finished run's files unchanged
    workdir_lock.WorkdirLock(str(tmp_path), 0, alone).acquire().release()


def test_processes_of_one_run_lock_their_own_files_and_fail_together(tmp_path):
    first = workdir_lock.WorkdirLock(str(tmp_path), 0, alone).acquire()
    second = workdir_lock.WorkdirLock(str(tmp_path), 1, alone).acquire()  # the same run's process 1
    assert {os.path.basename(first.path), os.path.basename(second.path)} == {".lock.0", ".lock.1"}
    second.release()
    # Another process of this run was refused: this one gives its lock back and fails as well.
    with pytest.raises(workdir_lock.WorkdirBusyError, match="another process of this run found a trainer"):
        workdir_lock.WorkdirLock(str(tmp_path), 1, lambda ok: False).acquire()
    workdir_lock.WorkdirLock(str(tmp_path), 1, alone).acquire().release()
    first.release()


def test_a_filesystem_without_locks_warns_and_trains_unprotected(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING"):
        workdir_lock.WorkdirLock(str(tmp_path), 0, alone).acquire().release()
    assert [r.getMessage() for r in caplog.records if "does not support file locks" in r.getMessage()] == [
        f"the filesystem of {tmp_path} does not support file locks (No locks available): a second trainer on "
        "this workdir would not be stopped."]


def test_train_refuses_a_held_workdir_before_touching_it(tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with workdir_lock.WorkdirLock(workdir, 0, alone):
        with pytest.raises(workdir_lock.WorkdirBusyError, match="is in use by another trainer"):
            train.train(tiny_config(), workdir, mesh=one_device_mesh())
    assert sorted(os.listdir(workdir)) == [".lock.0"]  # no checkpoints/, config.json or metrics


def _wait_for_holder(path, proc, timeout=300):
    deadline = time.time() + timeout
    while not (os.path.exists(path) and read(path).strip()):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the trainer did not take the lock in time"
        time.sleep(0.05)


def test_a_second_cli_trainer_exits_3_and_a_killed_one_leaves_no_stuck_lock(tmp_path):
    workdir = str(tmp_path / "run")
    first = subprocess.Popen(cli(workdir), cwd=ROOT, env=ONE_DEVICE_ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    lock_file = workdir_lock.lock_path(workdir, 0)
    try:
        _wait_for_holder(lock_file, first)
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the test needs
        second = subprocess.run(cli(workdir), cwd=ROOT, env=ONE_DEVICE_ENV, capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 3, second.stderr[-3000:]
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(
            f"[process 0] workdir error: the workdir {workdir} is in use by another trainer "
            f"(host {socket.gethostname()}, pid {first.pid}, started "), lines
    finally:
        first.kill()  # SIGKILL: no handler, no cleanup; the kernel drops the flock
        first.wait()
        first.stderr.close()
    # The crashed run's record stays (who crashed), its lock does not.
    assert json.loads(read(lock_file))["pid"] == first.pid
    workdir_lock.WorkdirLock(workdir, 0, alone).acquire().release()
