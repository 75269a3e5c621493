"""XLA flags of every test process, the pytest workers and the subprocesses tests start.

Optimisation level 0 of XLA's CPU backend (LLVM) and no expensive LLVM passes: the suite's
programs are tiny and compiled once or twice each, so compilation, not execution, is most of
its CPU time; these flags halved the CPU time of a 4-vs-1-device train-step test (53 s -> 24 s
of user time). They change code generation, not floating-point semantics (XLA's CPU backend does
not enable fast-math at any level); every numerical test keeps its reference and tolerance, and
a bit-exactness test compares programs compiled with the same flags.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a CPU process with ``devices`` simulated devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
