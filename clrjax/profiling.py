"""A JAX profiler trace of chosen training steps (``config.profile_steps``).

``config.profile_steps = (a, b)`` traces the steps that take the state from
step ``a`` to step ``b`` (steps a+1..b, counted as in metrics.jsonl) with
``jax.profiler.start_trace``/``stop_trace`` into ``<workdir>/profile``, on
process 0 only (each process would write its own host's trace; one is what a
user opens). The trace is TensorBoard's profile-plugin format
(``plugins/profile/<run>/<host>.xplane.pb``; docs/PERFORMANCE.md says how to
open it). Step 1 compiles the step: start at ``a >= 1`` to see steady state.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import jax
from absl import logging


class StepProfiler:
    """Starts the trace before step a+1 and stops it after step b (or when the loop ends first)."""

    def __init__(self, steps: Sequence[int], workdir: str, enabled: bool):
        self._range = tuple(int(s) for s in steps) if enabled and len(steps) == 2 else None
        self.directory = os.path.join(workdir, "profile")
        self._active = False

    def before_step(self, completed: int) -> None:
        """Called with the number of completed steps before running the next one."""
        if self._range is None or self._active:
            return
        first, last = self._range
        if first <= completed < last:
            if "://" not in self.directory:  # the profiler itself writes to gs:// and other URLs
                os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory)
            self._active = True
            logging.info("Profiling steps %d..%d into %s", completed + 1, last, self.directory)

    def after_step(self, completed: int, outputs: Any) -> None:
        """Stops after step b; waits for ``outputs`` first so the trace holds the device work."""
        if self._active and completed >= self._range[1]:
            self.stop(outputs)

    def stop(self, outputs: Any = None) -> None:
        if not self._active:
            return
        if outputs is not None:
            jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self._active = False
        self._range = None  # one trace per invocation
        logging.info("Profile written to %s (open with: tensorboard --logdir %s)", self.directory, self.directory)
