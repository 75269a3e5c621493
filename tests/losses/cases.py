"""The loss configurations every test iterates over, with their references.

A case wraps one loss call as ``run(z_a, z_b, cov, axis_name) -> (loss,
new_cov_or_None, metrics)`` and its float64 reference as ``ref(z_a, z_b, cov,
xp) -> (loss, new_cov_or_None, metrics)`` so the tests treat the four
methods (and their layouts) uniformly.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from clrjax.losses import barlow_twins_loss, simclr_loss, tico_loss, vicreg_loss
from tests.losses import reference

TEMPERATURE = 0.2
VICREG = dict(sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable
    ref: Callable

    def __repr__(self):
        return self.name


def _simclr(decoupled, chunk_size=None, monitors=True):
    def run(z_a, z_b, cov, axis_name):
        loss, metrics = simclr_loss(z_a, z_b, temperature=TEMPERATURE, decoupled=decoupled,
                                    chunk_size=chunk_size, axis_name=axis_name,
                                    monitors=monitors)
        return loss, None, metrics

    def ref(z_a, z_b, cov, xp=np):
        return reference.simclr(z_a, z_b, TEMPERATURE, decoupled, xp=xp), None, {}

    suffix = ("_dcl" if decoupled else "") + (f"_chunk{chunk_size}" if chunk_size else "")
    return Case("simclr" + suffix, run, ref)


def _barlow(impl, monitors=True):
    def run(z_a, z_b, cov, axis_name):
        loss, metrics = barlow_twins_loss(z_a, z_b, impl=impl, axis_name=axis_name,
                                          monitors=monitors)
        return loss, None, metrics

    def ref(z_a, z_b, cov, xp=np):
        loss, metrics = reference.barlow_twins(z_a, z_b, 0.0051, 1e-5, xp=xp)
        return loss, None, metrics

    return Case(f"barlow_twins_{impl}", run, ref)


def _vicreg(impl, monitors=True):
    def run(z_a, z_b, cov, axis_name):
        loss, metrics = vicreg_loss(z_a, z_b, impl=impl, axis_name=axis_name, monitors=monitors,
                                    **VICREG)
        return loss, None, metrics

    def ref(z_a, z_b, cov, xp=np):
        loss, metrics = reference.vicreg(z_a, z_b, xp=xp, **VICREG)
        return loss, None, metrics

    return Case(f"vicreg_{impl}", run, ref)


def _tico(impl, monitors=True):
    def run(z_a, z_b, cov, axis_name):
        return tico_loss(z_a, z_b, cov, beta=0.9, rho=8.0, impl=impl, axis_name=axis_name,
                         monitors=monitors)

    def ref(z_a, z_b, cov, xp=np):
        stop = jax.lax.stop_gradient if xp is not np else (lambda x: x)
        return reference.tico(z_a, z_b, cov, 0.9, 8.0, xp=xp, stop_gradient=stop)

    return Case(f"tico_{impl}", run, ref)


ONE_DEVICE = [_simclr(False), _simclr(True), _barlow("replicated"), _vicreg("replicated"),
              _tico("replicated")]
# The collapse monitors' cross-device equality is checked on the default layouts;
# the other layouts skip them to keep the test run short (they share that code).
MULTI_DEVICE = [_simclr(False), _simclr(True, chunk_size=5, monitors=False),
                _barlow("replicated"), _barlow("column_split", monitors=False),
                _vicreg("replicated"), _vicreg("column_split", monitors=False),
                _tico("replicated"), _tico("column_split", monitors=False)]


def embeddings(n, d, seed=0):
    """Random float64 views whose per-dim scales straddle 1 (both VICReg hinge branches)."""
    rng = np.random.default_rng(seed)
    scale = np.where(np.arange(d) % 2 == 0, 0.4, 2.0)
    z_a = rng.normal(size=(n, d)) * scale + 0.3
    z_b = z_a + 0.5 * rng.normal(size=(n, d)) * scale
    return z_a, z_b


def running_cov(d, seed=1):
    """A nonzero symmetric PSD cov, so beta * cov is exercised."""
    m = np.random.default_rng(seed).normal(size=(d, d)) / d
    return m @ m.T


def assert_close(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max(|expected|) elementwise (scale-aware)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    atol = rtol * max(np.max(np.abs(expected)), 1e-30)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)
