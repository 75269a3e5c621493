"""Input data: random-access sources (sources.py), the deterministic per-process
host pipeline (pipeline.py) and on-device JAX augmentations (augment.py)."""
