r"""Weighted kNN evaluation of a frozen encoder (Wu et al. 2018): a run's checkpoint or an export.

COMMAND:
  python experiments/knn_eval.py --workdir=runs/simclr_digits
  python experiments/knn_eval.py --encoder=runs/simclr_digits/export      # the export's recorded config
  python experiments/knn_eval.py --workdir=runs/simclr_digits --ks=20,200 --temperature=0.07

Each test feature votes with its k nearest (cosine) training features, weight exp(s / T)
(Wu et al. 2018, sec. 3.4; k = 20 and 200, T = 0.07), computed blockwise on device.
Writes knn_eval.json in the run directory (or the export directory, or --out) and prints one line.
Exit status: 0 done; 3 bad input (the message says what to fix); 6 knn_eval.json could not be written.
"""

from absl import app, flags, logging

from clrjax import cli

_ENC = cli.define_encoder_flags("knn_eval.json")
_KS = flags.DEFINE_list("ks", ["20", "200"], "Numbers of neighbours k (Wu et al. 2018: 200).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.07, "Vote temperature T (Wu et al. 2018: 0.07).")
_RULES = (cli.ints_at_least("ks", 1, "numbers of neighbours, e.g. --ks=20,200"),
          cli.positive_number("temperature", "Wu et al. 2018 use 0.07"))


def main(argv):
    del argv
    cli.check_flags("knn_eval", _RULES)
    _ENC.check("knn_eval", "knn_eval.json")
    from clrjax.evaluation import restore, run_eval

    ks = [int(k) for k in _KS.value]
    try:
        encoder = _ENC.restore()
        result = run_eval.run_knn_eval(encoder, ks=ks, temperature=_TEMPERATURE.value,
                                       progress=_ENC.progress.value)
    except restore.EvalInputError as err:
        cli.fail("knn_eval", err)
    path = _ENC.write("knn_eval", encoder, run_eval.KNN_EVAL_FILE, {"knn": result})
    print(run_eval.format_knn_line(result, path), flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=cli.parse_flags)
