r"""Linear evaluation of a frozen encoder: a pretraining run's checkpoint or an export.

COMMAND:
  python experiments/linear_eval.py --workdir=runs/simclr_digits                       # features protocol
  python experiments/linear_eval.py --workdir=runs/simclr_digits --few_shot            # + 1/5/10/25-shot
  python experiments/linear_eval.py --workdir=runs/simclr_digits --protocol=augmented --epochs=90
  python experiments/linear_eval.py --encoder=runs/simclr_digits/export   # its recorded config (--config overrides)

Protocols (clrjax/evaluation/run_eval.py; docs/EVALUATION.md):
  features   CLIP app. A.3: logistic regression on frozen features, l2 chosen on a held-out 20%.
  augmented  SimCLR app. B.5: linear head on random-resized-crop + flip views, SGD Nesterov 0.9,
             cosine lr (default 0.1 x batch / 256), no weight decay, centre-crop test.
  --few_shot k = 1, 5, 10, 25 examples per class, 5 draws, mean ± std (features protocol).
Reports top-1 and top-5 on config.dataset.test_split; merges the result into linear_eval.json
in the run directory (or the export directory, or --out) and prints one line.
Exit status: 0 done; 3 bad input (the message says what to fix); 6 linear_eval.json could not be written.
"""

from absl import app, flags, logging

from clrjax import cli

_ENC = cli.define_encoder_flags("linear_eval.json")
_PROTOCOL = flags.DEFINE_enum("protocol", "features", ["features", "augmented"], "Linear evaluation protocol.")
_FEW_SHOT = flags.DEFINE_bool("few_shot", False, "Also run 1/5/10/25-shot linear probes (5 draws each).")
_EPOCHS = flags.DEFINE_integer("epochs", 90, "augmented: training epochs (SimCLR app. B.5: 90).")
_LR = flags.DEFINE_float("lr", None, "augmented: base learning rate (default 0.1 x batch_size / 256).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "augmented: batch size (a multiple of the local devices).")
_RULES = (cli.int_at_least("epochs", 1, "augmented-protocol training epochs"),
          cli.positive_number("lr", "the augmented protocol's base learning rate"),
          cli.int_at_least("batch_size", 1, "the augmented protocol's batch size"))


def main(argv):
    del argv
    cli.check_flags("linear_eval", _RULES)
    _ENC.check("linear_eval", "linear_eval.json")
    from clrjax.evaluation import restore, run_eval

    try:
        encoder = _ENC.restore()
        results = run_eval.run_linear_eval(
            encoder, protocol=_PROTOCOL.value, few_shot_eval=_FEW_SHOT.value, epochs=_EPOCHS.value,
            lr=_LR.value, batch_size=_BATCH.value, progress=_ENC.progress.value)
    except restore.EvalInputError as err:
        cli.fail("linear_eval", err)
    path = _ENC.write("linear_eval", encoder, run_eval.LINEAR_EVAL_FILE, results)
    print(run_eval.format_linear_line(results, path), flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=cli.parse_flags)
