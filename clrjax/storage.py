"""Run directories on a local filesystem or on Google Cloud Storage (``gs://bucket/run``).

Every place that touches a workdir, an export or an evaluation output goes
through these functions, so a ``gs://`` path never reaches ``os.path`` (which
would make a local directory named ``gs:``). Local paths go to ``os`` exactly
as before (absolute paths, the same errors); ``gs://`` paths go to
``etils.epath``, the path library Orbax itself uses, whose ``gs://`` backend
is fsspec's ``gcsfs`` (etils ``epath/gpath.py``: fsspec unless TensorFlow is
installed, then ``tf.io.gfile``). Orbax writes the arrays of a checkpoint
through TensorStore's own ``gcs`` driver, which needs no Python package.

What an object store changes, and how clrjax handles it:
  * objects are written whole (a single upload is atomic: readers see the old
    object or the new one), so :func:`write_bytes` needs no temporary file;
  * there is no append: ``metrics.jsonl`` and the TensorBoard events are
    written locally and uploaded whole after each write (clrjax/metrics.py);
    gcsfs's own append mode silently overwrites (it warns "Append mode 'a' is
    not supported in GCS. Using overwrite mode instead");
  * there are no file locks: see clrjax/workdir_lock.py;
  * "directories" are name prefixes: :func:`makedirs` is a no-op there.

The ``gcs`` extra (``pip install 'clrjax[gcs]'``) installs gcsfs; a ``gs://``
path without it fails early with that command (:func:`check_supported`).
Credentials are Google's Application Default Credentials (a TPU VM's service
account needs nothing); ``STORAGE_EMULATOR_HOST`` points gcsfs at an emulator
and ``TENSORSTORE_GCS_HTTP_URL`` TensorStore (tests/test_gcs_workdir.py).
"""
from __future__ import annotations

import builtins
import io
import os
import posixpath
import shutil
from typing import IO, List

REMOTE_PREFIXES = ("gs://",)
INSTALL_HINT = "pip install 'clrjax[gcs]'"


class StorageUnsupportedError(RuntimeError):
    """A remote path whose filesystem package is missing; the message names the install command."""


def is_remote(path) -> bool:
    """Whether ``path`` is an object-store URL (``gs://...``)."""
    return str(path).startswith(REMOTE_PREFIXES)


def check_supported(path) -> None:
    """Raises StorageUnsupportedError for a ``gs://`` path when neither gcsfs nor TensorFlow is installed."""
    if not is_remote(path):
        return
    import importlib.util
    if importlib.util.find_spec("gcsfs") is None and importlib.util.find_spec("tensorflow") is None:
        raise StorageUnsupportedError(
            f"{path} is on Google Cloud Storage, which needs the gcsfs package: {INSTALL_HINT}")


def absolute(path) -> str:
    """The absolute form: ``~`` expanded and made absolute locally; a URL as given, without a trailing ``/``."""
    path = os.fspath(path)
    if is_remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest) if rest.strip('/') else rest}"
    return os.path.abspath(os.path.expanduser(path))


def join(path, *names) -> str:
    path = os.fspath(path)
    if is_remote(path):
        return posixpath.join(path, *names)
    return os.path.join(path, *names)


def dirname(path) -> str:
    path = os.fspath(path)
    if is_remote(path):
        parent = posixpath.dirname(path.rstrip("/"))
        return parent if "://" in parent and parent.split("://", 1)[1] else path
    return os.path.dirname(path)


def is_within(path, directory) -> bool:
    """Whether ``path`` is ``directory`` or under it (both made absolute)."""
    path, directory = absolute(path), absolute(directory)
    sep = "/" if is_remote(directory) else os.sep
    return path == directory or path.startswith(directory.rstrip(sep) + sep)


def _epath(path):
    from etils import epath
    check_supported(path)
    return epath.Path(path)


def _fresh(path):
    """The epath of ``path`` after dropping gcsfs's listing cache: TensorStore writes checkpoint
    objects behind gcsfs's back, so a cached listing can miss them."""
    p = _epath(path)
    try:
        from etils.epath import backend
        fs = backend.fsspec_backend.fs(os.fspath(p))
        fs.invalidate_cache()
    except Exception:  # tf.io.gfile backend, or an fsspec without a cache: nothing to drop
        pass
    return p


def exists(path) -> bool:
    return _fresh(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
    return _fresh(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
    if is_remote(path):
        p = _fresh(path)
        return p.exists() and not p.is_dir()
    return os.path.isfile(path)


def listdir(path) -> List[str]:
    """Names in ``path`` (raises FileNotFoundError if there is none)."""
    if is_remote(path):
        p = _fresh(path)
        if not p.is_dir():
            raise FileNotFoundError(2, "No such directory", os.fspath(path))
        return [child.name for child in p.iterdir()]
    return os.listdir(path)


def makedirs(path) -> None:
    if is_remote(path):
        _epath(path)  # only the package check: object stores have no directories to create
        return
    os.makedirs(path, exist_ok=True)


def open(path, mode: str = "r") -> IO:  # noqa: A001 (the module's open, like io.open)
    """A file object; on an object store, ``w`` modes upload the whole object on close and
    ``a`` modes are refused (gcsfs would silently overwrite)."""
    if is_remote(path):
        if "a" in mode or "+" in mode:
            raise ValueError(f"{path}: object stores cannot append or update in place (mode {mode!r})")
        return _epath(path).open(mode)
    return builtins.open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))


def read_text(path) -> str:
    with open(path, "r") as f:
        return f.read()


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_bytes(path, data: bytes) -> None:
    """Writes an object whole (remote) or a file (local, not atomically: see metrics.write_text_atomically)."""
    with open(path, "wb") as f:
        f.write(data)


def upload(local_path: str, path) -> None:
    """Copies the local file ``local_path`` to ``path`` (any store)."""
    if is_remote(path):
        with builtins.open(local_path, "rb") as f:
            write_bytes(path, f.read())
    else:
        shutil.copyfile(local_path, path)


def remove(path) -> None:
    _epath(path).unlink() if is_remote(path) else os.remove(path)


def rmtree(path) -> None:
    _epath(path).rmtree() if is_remote(path) else shutil.rmtree(path)


def rename(path, target) -> None:
    """Renames a file or directory; on an object store this copies then deletes each object."""
    if is_remote(path):
        _epath(path).rename(target)
    else:
        os.rename(path, target)


def save_figure(figure, path) -> None:
    """``figure.savefig`` as PNG to any store (matplotlib writes local paths only)."""
    if not is_remote(path):
        figure.savefig(path, format="png", dpi=100)
        return
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    write_bytes(path, buffer.getvalue())
