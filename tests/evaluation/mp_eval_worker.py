"""One process of tests/evaluation/test_multiprocess_eval.py: features and kNN/linear results of a
seeded random cnn_small on digits, every process extracting its share (protocols.source_features).

  python launch/local.py --num_processes=2 --devices_per_process=4 tests/evaluation/mp_eval_worker.py --out=DIR
  python tests/evaluation/mp_eval_worker.py --out=DIR           (one process, all its devices)

Writes DIR/p<I>.npz: train/test features and labels, the rows this process read from each
split, the results (knn, linear) and a random tiny CLIP model's zero-shot and retrieval
report (image_text) as JSON text.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


class CountingSource:
    """A data source that counts the rows read from it (what this process extracted)."""

    def __init__(self, source):
        self._source, self.rows_read = source, 0

    def __getattr__(self, name):
        return getattr(self._source, name)

    def __len__(self):
        return len(self._source)

    def __getitem__(self, index):
        got = self._source[index]
        self.rows_read += len(got["label"])
        return got


def features_and_results(batch_size: int = 104):
    """(FeatureSet, results, rows read per split) of the seeded encoder on this process's devices."""
    import jax
    import jax.numpy as jnp
    from clrjax import config as config_lib, models, parallel
    from clrjax.data import sources
    from clrjax.evaluation import protocols, run_eval

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "simclr.py") + ":digits")
    config = config_lib.apply_overrides(config, {"model.widths": (8, 16, 16, 16), "eval.batch_size": batch_size,
                                                 "eval.max_train_examples": 0})
    model = models.build_ssl_model(config.model.to_dict(), config.projector.to_dict(), 10)
    crop = int(config.augment.crop_size)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((2, crop, crop, 1)), train=False)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    mesh = protocols.eval_mesh()
    splits = tuple(CountingSource(sources.load_digits(s)) for s in ("train", "test"))
    encode = run_eval.make_encode_fn(model, config.augment.to_dict())
    fs = protocols.features_of_splits(encode, parallel.replicate(variables, mesh), splits, config.eval, mesh)
    results = {"knn": protocols.knn_result(fs, (5, 20)), "linear": protocols.linear_features_result(fs)}
    return fs, results, [s.rows_read for s in splits]


def image_text_report(batch_size: int = 16):
    """Zero-shot and retrieval (zero_shot.image_text_report) of a seeded random tiny CLIP model on the
    first 37 digits test images (37: not a multiple of any device or process count)."""
    import jax
    import jax.numpy as jnp
    from clrjax import config as config_lib, methods, parallel
    from clrjax.data import class_captions, sources
    from clrjax.evaluation import protocols, zero_shot

    config = config_lib.load_config_file(os.path.join(ROOT, "configs", "clip.py") + ":digits")
    config = config_lib.apply_overrides(config, {"model.widths": (8, 8, 16, 16), "eval.batch_size": batch_size})
    rows = sources.load_digits("test")[np.arange(37)]
    source = class_captions.ClassCaptionSource(sources.ArraySource(rows["image"], rows["label"], 10),
                                               class_captions.DIGIT_NAMES)
    model = methods.get("clip").build_model(config, 10)
    crop = int(config.augment.crop_size)
    variables = dict(model.init(jax.random.PRNGKey(1), jnp.zeros((2, crop, crop, 1)), train=False))
    mesh = protocols.eval_mesh()
    return zero_shot.image_text_report(model, parallel.replicate(variables, mesh), config, mesh, source=source)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--coordinator_address")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    args = parser.parse_args()
    from clrjax import parallel
    parallel.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    import jax
    import numpy as np

    fs, results, rows = features_and_results()
    np.savez(os.path.join(args.out, f"p{jax.process_index()}.npz"), train_x=fs.train_x, train_y=fs.train_y,
             test_x=fs.test_x, test_y=fs.test_y, rows=np.array(rows), results=json.dumps(results),
             local_devices=jax.local_device_count(), processes=jax.process_count(),
             image_text=json.dumps(image_text_report()))


if __name__ == "__main__":
    main()
