"""One process of tests/data/test_captions.py's multi-process check (started by launch/local.py).

Builds the captioned in-memory source of the test, reads 4 steps of its TrainLoader with this
process's rows, assembles each step's 'text', 'label' and 'index' into global arrays over all
processes' devices (``clrjax.parallel.host_to_global``, as the trainer does) and process 0 saves
the gathered global arrays to ``--out`` (.npz); then the data counters of 3 steps, all-gathered.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402


def captioned_source():
    from clrjax.data.sources import ArraySource

    n = 48
    images = np.arange(n * 16, dtype=np.uint8).reshape(n, 4, 4, 1)
    captions = [[f"example {k} caption {v}" for v in range(1 + k % 4)] for k in range(n)]
    return ArraySource(images, np.arange(n) % 5, captions=captions)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()

    import jax
    from jax.experimental import multihost_utils

    from clrjax import parallel
    from clrjax.data.pipeline import TrainLoader
    from clrjax.data.tokenizers import ByteTokenizer

    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    mesh = parallel.make_mesh()
    out = {}
    with TrainLoader(captioned_source(), 16, 7, process_index=jax.process_index(),
                     process_count=jax.process_count(), tokenizer=ByteTokenizer(24)) as loader:
        for step in range(4):
            batch = next(loader)
            arrays = parallel.host_to_global({k: batch[k] for k in ("text", "label", "index")}, mesh)
            for key, value in arrays.items():
                out[f"{key}_{step}"] = np.asarray(multihost_utils.process_allgather(value, tiled=True))
    # clrjax/data/counters.py through the real all-gather: captions of examples >= 10 do not fit 21
    # tokens; the bad ids are made up per process (3 on both, 7 + p on process p).
    from clrjax.data import counters

    with TrainLoader(captioned_source(), 16, 7, process_index=jax.process_index(),
                     process_count=jax.process_count(), tokenizer=ByteTokenizer(21)) as loader:
        for _ in range(3):
            next(loader)
        snap = counters.Snapshot(loader.captions_cut, 5, np.asarray([3, 7 + jax.process_index()], np.int64))
        everyone = counters.gather(snap)
    out["cut_per_process"] = np.asarray([s.captions_cut for s in everyone])
    out["combined"] = np.asarray([counters.combine(everyone, 100)[k] for k in ("captions_cut", "data_skipped")])
    if jax.process_index() == 0:
        np.savez(args.out, **out)


if __name__ == "__main__":
    main()
