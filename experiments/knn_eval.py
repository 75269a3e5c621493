r"""Weighted kNN evaluation of a frozen encoder (Wu et al. 2018): a run's checkpoint or an export.

COMMAND:
  python experiments/knn_eval.py --workdir=runs/simclr_digits
  python experiments/knn_eval.py --encoder=runs/simclr_digits/export --config=configs/simclr.py:digits
  python experiments/knn_eval.py --workdir=runs/simclr_digits --ks=20,200 --temperature=0.07

Each test feature votes with its k nearest (cosine) training features, weight exp(s / T)
(Wu et al. 2018, sec. 3.4; k = 20 and 200, T = 0.07), computed blockwise on device.
Writes knn_eval.json in the run directory (or the export directory, or --out) and prints one line.
Exit status: 0 done; 3 bad input (the message says what to fix).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<method>.py:<preset>); default: the run's config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory (uses its latest checkpoint).")
_ENCODER = flags.DEFINE_string("encoder", None, "Export directory written by experiments/export.py (needs --config).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "Directory for knn_eval.json (default: the run or export directory).")
_KS = flags.DEFINE_list("ks", ["20", "200"], "Numbers of neighbours k (Wu et al. 2018: 200).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.07, "Vote temperature T (Wu et al. 2018: 0.07).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress line on stderr.")

EXIT_BAD_INPUT = 3


def main(argv):
    del argv
    from clrjax.evaluation import restore, run_eval

    try:
        ks = [int(k) for k in _KS.value]
    except ValueError:
        print(f"knn_eval: --ks={','.join(_KS.value)} must be integers, e.g. --ks=20,200.", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    try:
        encoder = restore.from_flags(_WORKDIR.value, _ENCODER.value, _CONFIG.value, _STEP.value)
        result = run_eval.run_knn_eval(encoder, ks=ks, temperature=_TEMPERATURE.value, progress=_PROGRESS.value)
    except restore.EvalInputError as err:
        print(f"knn_eval: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    result["command"] = " ".join(sys.argv)
    out_dir = restore.output_dir(encoder, _OUT.value)
    path = run_eval.write_result(out_dir, run_eval.KNN_EVAL_FILE, {"knn": result})
    print(run_eval.format_knn_line(result, path), flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
