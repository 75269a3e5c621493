"""Launchers: local multi-process runs, SLURM and TPU-pod scripts, hyper-parameter sweeps.

The modules are command-line tools (``python launch/local.py ...``,
``python launch/sweep.py ...``); the package exists so that sweep files can
``from launch import hyper``. See docs/LAUNCH.md.
"""
