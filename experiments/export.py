r"""Exports the encoder of a pretraining run for downstream use (no projector, no optimizer state).

COMMAND:
  python experiments/export.py --workdir=runs/simclr_digits            # -> runs/simclr_digits/export
  python experiments/export.py --workdir=runs/simclr_c10 --out=/tmp/enc --formats=orbax,safetensors,torch --step=2000

Writes (clrjax/export.py; loading per format: docs/EVALUATION.md):
  model_config.json, preprocessing.json (mean, std, image_size of the run's eval preprocessing),
  encoder/ (Orbax), encoder.safetensors, encoder_torchvision.pt (ResNet) or encoder_timm.pt (ViT),
  export_source.json (the run directory and checkpoint step).
By default 'torch' is skipped with a note where it cannot be written (cnn_small, or no PyTorch);
asking for it explicitly then fails. Exit status: 0 done; 3 bad input.
"""
import os

from absl import app, flags, logging

from clrjax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory.")
_OUT = flags.DEFINE_string("out", None, "Export directory (default: <workdir>/export).")
_FORMATS = flags.DEFINE_list("formats", ["orbax", "safetensors", "torch"], "Formats to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")


def main(argv):
    del argv
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required, e.g. --workdir=runs/simclr_digits")
    from clrjax.evaluation import restore

    requested = _FORMATS.value if flags.FLAGS["formats"].present else None
    try:
        written, notes, encoder = restore.export_run(_WORKDIR.value, _OUT.value, requested, _STEP.value)
    except restore.EvalInputError as err:
        cli.fail("export", err)
    for note in notes:
        print(f"export: note: {note}")
    formats = ", ".join(k for k in written if k not in ("config", "preprocessing"))
    print(f"exported {encoder.model_cfg['name']} of {encoder.path} step {encoder.step} ({formats}) "
          f"-> {os.path.dirname(written['config'])}", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main)
