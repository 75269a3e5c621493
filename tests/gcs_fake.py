"""A local Google Cloud Storage for tests: gcp-storage-emulator (PyPI) with two GCS behaviours it lacks.

The emulator speaks the GCS JSON API that gcsfs and TensorStore's ``gcs``
kvstore use, but (version 2026.7.19) sends no ``x-goog-generation`` header
with a download and ignores the ``ifGenerationMatch`` /
``ifGenerationNotMatch`` preconditions. TensorStore reads an object's
generation from that header and writes OCDBT manifests (Orbax checkpoints)
conditionally on it (without it: ``Malformed StorageGeneration``), so both are
added here as GCS documents them (JSON API reference, "Objects: get" and
"Objects: insert"; "Request preconditions": a failed ``ifGenerationMatch`` is
412, a matching ``ifGenerationNotMatch`` on a download is 304;
``ifGenerationMatch=0`` means "only if the object does not exist"). It also serves
one connection at a time, which a client's idle pooled connection stalls (seen as a
hung Orbax restore): connections get threads, requests still run one at a time.

``python tests/gcs_fake.py PORT BUCKET`` serves in memory until killed;
:class:`FakeGcs` starts that as a subprocess and gives the environment that
points gcsfs (``STORAGE_EMULATOR_HOST``) and TensorStore
(``TENSORSTORE_GCS_HTTP_URL``, ``GOOGLE_AUTH_TOKEN_FOR_TESTING``) at it.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from http import HTTPStatus


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _current_generation(storage, bucket: str, name: str, not_found) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except not_found:
        return "0"  # GCS: generation 0 stands for "no live object"


def _upload_name(request):
    if "name" in request.query:
        return request.query["name"][0]
    data = request.data if isinstance(request.data, dict) else {}
    return (data.get("meta") or data).get("name")


def _patch_emulator():
    """Wraps the emulator's object upload and download handlers (before its router is built)."""
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    insert, download = objects.insert, objects.download

    def conditional_insert(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        name = _upload_name(request)
        if wanted and name is not None and "upload_id" not in request.query:
            if wanted[0] != _current_generation(storage, request.params["bucket_name"], name, NotFound):
                response.status = HTTPStatus.PRECONDITION_FAILED
                return None
        return insert(request, response, storage, *args, **kwargs)

    def download_with_generation(request, response, storage, *args, **kwargs):
        bucket, name = request.params["bucket_name"], request.params["object_id"]
        current = _current_generation(storage, bucket, name, NotFound)
        match, not_match = request.query.get("ifGenerationMatch"), request.query.get("ifGenerationNotMatch")
        if current != "0" and match and match[0] != current:
            response.status = HTTPStatus.PRECONDITION_FAILED
            return None
        if current != "0" and not_match and not_match[0] == current:
            response.status = HTTPStatus.NOT_MODIFIED
            response["x-goog-generation"] = current
            return None
        result = download(request, response, storage, *args, **kwargs)
        if current != "0":
            response["x-goog-generation"] = current
            response["x-goog-metageneration"] = str(storage.get_file_obj(bucket, name).get("metageneration", "1"))
        return result

    objects.insert, objects.download = conditional_insert, download_with_generation


def _serve_connections_in_threads():
    """The emulator serves one connection at a time (``http.server.HTTPServer``): a client that
    opens a connection and sends nothing yet (connection pools do) stalls every other client.
    Connections get threads here; the requests themselves still run one at a time (the
    emulator's storage is not thread-safe)."""
    import http.server
    import threading
    from gcp_storage_emulator import server

    one_at_a_time = threading.Lock()
    for name in ("do_GET", "do_POST", "do_DELETE", "do_PUT", "do_PATCH"):
        def locked(self, _handle=getattr(server.RequestHandler, name)):
            with one_at_a_time:
                return _handle(self)
        setattr(server.RequestHandler, name, locked)
    server.server.HTTPServer = http.server.ThreadingHTTPServer


def serve(port: int, bucket: str) -> None:
    _patch_emulator()
    _serve_connections_in_threads()
    from gcp_storage_emulator.server import create_server

    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()


class FakeGcs:
    """Context manager: the fake server on a free localhost port; ``env`` points clients at it.

    Raises RuntimeError (the server's output) when it does not answer within ``timeout`` seconds.
    """

    def __init__(self, bucket: str = "bucket", timeout: float = 30.0):
        self.bucket = bucket
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                    "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
                    "GOOGLE_CLOUD_PROJECT": "test-project",
                    # gcsfs's zonal-bucket detection asks a control-plane API the emulator lacks.
                    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
        self._timeout = timeout
        self._proc = None

    def __enter__(self) -> "FakeGcs":
        # The server logs every request it cannot serve (orbax probes for absent files); into an undrained
        # pipe that fills after 64 KiB and blocks the server mid-request, hanging the client for good.
        self._log = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(self.port), self.bucket],
                                      stdout=self._log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{self.bucket}", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        output = self.stop()
        raise RuntimeError(f"the fake GCS server did not start: {output[-2000:]}")

    def stop(self) -> str:
        if self._proc is None:
            return ""
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None
        self._log.seek(0)
        output = self._log.read()
        self._log.close()
        return output

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.argv[2])
