"""Test setup: simulate 8 CPU devices and share one compilation cache.

Both must happen before JAX is imported. They are set through the
environment so that the subprocesses tests start (the CLI, kill/SIGTERM
runs, multi-process launches) inherit them too.
"""
import os
import tempfile

from tests.xla_env import xla_flags  # noqa: E402  (plain module: imports nothing)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network: TFDS must not try catalog downloads.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_unused"))
# Tests compile the same train step many times (each train() call, each resumed
# or killed subprocess). A persistent compilation cache, fresh for every test
# session so it never serves a stale program, turns the repeats into hits.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="clrjax-test-jit-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (imported after the environment on purpose)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes on 2 CPU cores; run with -m slow")
