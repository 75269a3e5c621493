"""One trainer per workdir: an advisory lock each process of the run holds while it trains.

Two trainers on one workdir (a job submitted twice is common) would overwrite
each other's checkpoints and metrics. :class:`WorkdirLock` takes an exclusive
``fcntl.flock`` on ``<workdir>/.lock.<process index>`` and keeps the file open
until the run ends. The kernel releases a flock when its holder dies, however
it dies (kill -9, OOM, a crashed node's local filesystem), so a crashed run
never leaves a stale lock behind and no lock file is ever deleted (deleting
one lets two processes lock two different files of the same name). While
locked, the file holds the holder's host, pid and start time, which the
refusal names; a run that ends empties it again (so a finished run's files
are unchanged by a later invocation that fails), a crashed one leaves it.

One lock file per process index makes the rule "one process group per
workdir": the processes of one multi-process run lock different files, a
second submission of the same run (any process count) collides on at least
``.lock.0``. The processes then agree (an all-gather) on whether all of them
got their lock, so a partially locked second run fails as a whole, promptly,
instead of leaving some processes waiting in a collective for ones that
exited.

Filesystems: flock is local to a node on filesystems that do not forward
it. Linux NFS clients map flock to NFS byte-range locks, which hold across
hosts (NFSv4, or NFSv3 with lockd); a lock of a crashed NFS client is
released when its lease expires (NFSv4: about 90 s). Lustre needs the
``flock`` mount option (``localflock`` only locks per node) and some FUSE
filesystems (e.g. object-store mounts) have no locks: where flock reports
that locks are unsupported, the run goes on with a one-line warning that it is
unprotected.

Object stores (``gs://`` workdirs, clrjax/storage.py) have no locks at all, and
no lock file there would be honest: an object cannot be released by the death
of its writer, so a preempted TPU job (the common case) would leave a lock that
blocks its own requeued run, and a lease renewed by a heartbeat would need
every host's clock to agree and would still let a paused holder write after it
expired. clrjax therefore takes no lock on a ``gs://`` workdir and says so in
one warning line (process 0): keep one job per GCS workdir yourself (a
scheduler's unique job name, or a fresh run directory per submission).
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Callable, Optional

from clrjax import storage

LOCK_PREFIX = ".lock."
# What flock raises where the filesystem has no locks (not: another holder).
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class WorkdirBusyError(RuntimeError):
    """Another live trainer holds the workdir; the message names it and the fix."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    return storage.join(storage.absolute(workdir), f"{LOCK_PREFIX}{process_index}")


def describe_holder(path: str) -> str:
    """``host H, pid P, started T`` from a lock file (what its holder wrote), or a fallback."""
    try:
        with open(path) as f:
            holder = json.load(f)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "its holder did not record itself yet"


class WorkdirLock:
    """Context manager: holds ``<workdir>/.lock.<process_index>`` while the run trains.

    ``agree`` combines the processes' outcomes (True: all got their lock); the
    default is :func:`all_processes_agree`, a no-op in one-process runs.
    """

    def __init__(self, workdir: str, process_index: Optional[int] = None,
                 agree: Optional[Callable[[bool], bool]] = None):
        self.workdir = storage.absolute(workdir)
        self.process_index = _process_index() if process_index is None else process_index
        self.path = lock_path(self.workdir, self.process_index)
        self._agree = all_processes_agree if agree is None else agree
        self._fd: Optional[int] = None

    def acquire(self) -> "WorkdirLock":
        refusal = self._try_lock()
        if not self._agree(refusal is None):
            self.release()
            raise WorkdirBusyError(refusal or (
                f"the workdir {self.workdir} is in use: another process of this run found a trainer "
                "already running there (see its error); wait for that run to finish or stop it, or use "
                "another --workdir."))
        return self

    def _try_lock(self) -> Optional[str]:
        """None when locked (or locks are unsupported); else the refusal message."""
        if storage.is_remote(self.workdir):
            if self.process_index == 0:
                logging.getLogger("absl").warning(
                    "%s is on an object store, which has no file locks: a second trainer on this workdir "
                    "would not be stopped (docs/LAUNCH.md, runs on Google Cloud Storage).", self.workdir)
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return (f"the workdir {self.workdir} is in use by another trainer ({describe_holder(self.path)}); "
                    "wait for it to finish or stop it, or use another --workdir.")
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                os.close(fd)
                raise
            logging.getLogger("absl").warning(
                "the filesystem of %s does not support file locks (%s): a second trainer on this workdir "
                "would not be stopped.", self.workdir, err.strerror)
        self._fd = fd
        self._record_holder()
        return None

    def _record_holder(self) -> None:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(holder) + "\n").encode(), 0)

    def release(self) -> None:
        """Empties the file (a run that ended leaves no holder behind; a crashed one leaves its
        record, which names who crashed) and closes it, which releases the lock. The file itself
        stays (see the module docstring)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass  # the lock is released all the same; the record is only information
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkdirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _process_index() -> int:
    import jax
    return jax.process_index()


def all_processes_agree(ok: bool) -> bool:
    """True only if ``ok`` on every process of the run."""
    import jax
    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(ok))).all())
