#!/usr/bin/env bash
# The GPU benchmarks behind BENCHMARKS.md's "GPU" section: ONE command of at most 9 minutes on
# one NVIDIA H200. Everything is in benchmarks/gpu_run.py (see its docstring); this wrapper keeps
# the old interface.
#
# Usage:  bash benchmarks/run_gpu_benchmarks.sh [OUT_DIR] [gpu_run.py options...]
#         (default OUT_DIR: benchmark_results/gpu)
# Before: python benchmarks/gpu_run.py --prepare   (here: fills benchmarks/carry, which travels)
#         python benchmarks/gpu_run.py --check     (here, on CPU: every config, every part, tiny)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmark_results/gpu}
exec "${PY:-python3}" benchmarks/gpu_run.py --out "$OUT" "${@:2}"
