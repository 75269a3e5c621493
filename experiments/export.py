r"""Exports the encoder of a pretraining run for downstream use (no projector, no optimizer state).

COMMAND:
  python experiments/export.py --workdir=runs/simclr_digits            # -> runs/simclr_digits/export
  python experiments/export.py --workdir=runs/simclr_c10 --out=/tmp/enc --formats=orbax,safetensors,torch --step=2000
  python experiments/export.py --workdir=runs/byol_digits --network=target --out=runs/byol_digits/export_target

Writes (clrjax/export.py; loading per format: docs/EVALUATION.md):
  model_config.json, preprocessing.json (mean, std, image_size of the run's eval preprocessing),
  encoder/ (Orbax), encoder.safetensors, encoder_torchvision.pt (ResNet) or encoder_timm.pt (ViT),
  export_source.json (the run directory, checkpoint step, network and the run's config).
--network=target exports the EMA target encoder of a momentum method (BYOL, MoCo) instead of
the online encoder. An --out that holds another run's (or network's) export is refused unless
--overwrite; re-exporting the same run replaces its own export.
By default 'torch' is skipped with a note where it cannot be written (cnn_small, or no PyTorch);
asking for it explicitly then fails. Exit status: 0 done; 3 bad input; 6 the export could not be written.
"""

from absl import app, flags, logging

from clrjax import cli, storage

_WORKDIR = flags.DEFINE_string("workdir", None, "Pretraining run directory.")
_OUT = flags.DEFINE_string("out", None, "Export directory (default: <workdir>/export).")
_FORMATS = flags.DEFINE_list("formats", ["orbax", "safetensors", "torch"], "Formats to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NETWORK = flags.DEFINE_enum("network", "online", ["online", "target"],
                             "online: the trained encoder; target: the EMA target encoder of a momentum "
                             "method (byol, moco_v2, moco_v3).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an export of another run (or network) in --out.")


def _check_flags() -> None:
    """Flag ranges and the output directory, before the checkpoint is read (clrjax/cli.py)."""
    from clrjax import export as export_lib

    if not _WORKDIR.value:
        cli.fail("export", "--workdir is required, e.g. --workdir=runs/simclr_digits")
    cli.check_flags("export", (cli.int_at_least("step", 0, "a checkpoint step of --workdir"),
                               cli.one_of("formats", export_lib.FORMATS, many=True)))
    cli.check_output_dir("export", "out" if _OUT.value else "workdir",
                         _OUT.value or storage.join(_WORKDIR.value, "export"))


def main(argv):
    del argv
    _check_flags()
    from clrjax.evaluation import restore

    requested = _FORMATS.value if flags.FLAGS["formats"].present else None
    out = storage.absolute(_OUT.value or storage.join(_WORKDIR.value, "export"))
    try:
        written, notes, encoder = cli.write_or_fail("export", lambda: restore.export_run(
            _WORKDIR.value, _OUT.value, requested, _STEP.value, network=_NETWORK.value,
            overwrite=_OVERWRITE.value), "the export", under=out)
    except restore.EvalInputError as err:
        cli.fail("export", err)
    for note in notes:
        print(f"export: note: {note}")
    formats = ", ".join(k for k in written if k not in ("config", "preprocessing"))
    network = " (target network)" if encoder.network != "online" else ""
    print(f"exported {encoder.model_cfg['name']} of {encoder.path} step {encoder.step}{network} ({formats}) "
          f"-> {storage.dirname(written['config'])}", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=cli.parse_flags)
