r"""Zero-shot classification and image<->text retrieval of an image-text run (CLIP, SigLIP, LiT).

COMMAND:
  python experiments/zero_shot_eval.py --workdir=runs/clip_digits                     # both, where the split allows
  python experiments/zero_shot_eval.py --workdir=runs/clip_digits --evaluations=zero_shot \
      --template='a photo of a {}.' --template='a drawing of the digit {}.'
  python experiments/zero_shot_eval.py --workdir=runs/clip_digits --evaluations=retrieval --block_size=1024
  python experiments/zero_shot_eval.py --workdir=runs/clip_digits --step=2000 \
      --config=configs/clip.py:digits --config.dataset.test_split=test   # another config: same towers
  python experiments/zero_shot_eval.py --encoder=runs/clip_digits/export    # its export (experiments/export.py)

Zero-shot (CLIP, Radford et al. 2021, sec. 3.1.4): every class name of config.dataset.test_split
is written into each prompt template, the normalised text embeddings of a class are averaged
("ensembling"), and each image takes the class of highest cosine: top-1 and top-5. Templates:
--template (repeatable), else the dataset's own (the phrasings it was trained on), else CLIP's
"a photo of a {}.". Retrieval: every test image with one of its captions (the one the pipeline
gives it in epoch 0), image->text and text->image Recall@1/5/10, scored in blocks of --block_size
texts (memory images x block_size, whatever the split size). The numbers are those of the run's
final report (eval.json) and of the periodic evaluators zero_shot and retrieval.
One program for both: they share the restored towers and the test split's image embeddings.
--encoder takes an image-text export (both towers; clrjax.export.load_image_text) and its recorded config.
Writes zero_shot_eval.json in the run or export directory (or --out) and prints one line.
Exit status: 0 done; 3 bad input (the message says what to fix); 6 zero_shot_eval.json could not be written.
"""

from absl import app, flags, logging

from clrjax import cli

_ENC = cli.define_encoder_flags("zero_shot_eval.json")
_EVALUATIONS = flags.DEFINE_list("evaluations", [], "zero_shot, retrieval or both (default: every one the test "
                                 "split supports: class names for zero_shot, captions for retrieval).")
_TEMPLATES = flags.DEFINE_multi_string("template", [], "A prompt template with one {} for the class name; repeat "
                                       "for an ensemble (default: the dataset's own templates).")
_BLOCK = flags.DEFINE_integer("block_size", None, "Retrieval: texts scored per block (default 4096).")
_RULES = (cli.Rule("evaluations", lambda v: all(x in ("zero_shot", "retrieval") for x in v),
                   "be zero_shot, retrieval or zero_shot,retrieval"),
          cli.int_at_least("block_size", 1, "texts per retrieval scoring block, e.g. 4096"))


def main(argv):
    del argv
    cli.check_flags("zero_shot_eval", _RULES)
    _ENC.check("zero_shot_eval", "zero_shot_eval.json")
    from clrjax.evaluation import restore, towers as towers_lib

    try:
        towers, evaluations = towers_lib.towers_from_flags(
            _ENC.workdir.value, _ENC.encoder.value, _ENC.config.value, _ENC.step.value, _EVALUATIONS.value)
        results = towers_lib.run_zero_shot_eval(towers, evaluations, templates=_TEMPLATES.value,
                                                block_size=_BLOCK.value, progress=_ENC.progress.value)
    except restore.EvalInputError as err:
        cli.fail("zero_shot_eval", err)
    path = _ENC.write("zero_shot_eval", towers, towers_lib.ZERO_SHOT_EVAL_FILE, results)
    print(towers_lib.format_line(results, path), flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=cli.parse_flags)
