r"""Exports the encoder of a pretraining run for downstream use (no projector, no optimizer state).

COMMAND:
  python experiments/export.py --workdir=runs/simclr_digits            # -> runs/simclr_digits/export
  python experiments/export.py --workdir=runs/simclr_c10 --out=/tmp/enc --formats=orbax,safetensors,torch --step=2000
  python experiments/export.py --workdir=runs/byol_digits --network=target --out=runs/byol_digits/export_target

Writes (clrjax/export.py; loading per format: docs/EVALUATION.md):
  model_config.json, preprocessing.json (mean, std, image_size of the run's eval preprocessing),
  encoder/ (Orbax), encoder.safetensors, encoder_torchvision.pt (ResNet) or encoder_timm.pt (ViT),
  export_source.json (the run directory, checkpoint step, network and the run's config).
Image-text runs (clip, siglip) also get both towers: image_text.json (text tower, tokenizer settings,
learned logit scale / SigLIP bias), tokenizer/<vocabulary file> (SentencePiece/BPE only),
image_text/ (Orbax) and image_text.safetensors (both towers in one file); load them with
clrjax.export.load_image_text (encode_image, encode_text). load_encoder still reads the image encoder.
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
    from clrjax.data import tokenizers
    from clrjax.evaluation import restore

    requested = _FORMATS.value if flags.FLAGS["formats"].present else None
    out = storage.absolute(_OUT.value or storage.join(_WORKDIR.value, "export"))
    try:
        towers = two_towers_of_run(_WORKDIR.value)  # before anything is written: a missing vocabulary fails here
        written, notes, encoder = cli.write_or_fail("export", lambda: restore.export_run(
            _WORKDIR.value, _OUT.value, requested, _STEP.value, network=_NETWORK.value,
            overwrite=_OVERWRITE.value), "the export", under=out)
        written.update(cli.write_or_fail("export", lambda: write_text_side(encoder, out, towers, requested),
                                         "the export", under=out))
    except (restore.EvalInputError, tokenizers.TokenizerError) as err:
        cli.fail("export", err)
    for note in notes:
        print(f"export: note: {note}")
    formats = ", ".join(k for k in written if k in ("orbax", "safetensors", "torch"))
    network = " (target network)" if encoder.network != "online" else ""
    what = encoder.model_cfg["name"] + (" + text tower" if "image_text" in written else "")
    print(f"exported {what} of {encoder.path} step {encoder.step}{network} ({formats}) "
          f"-> {storage.dirname(written['config'])}", flush=True)


def two_towers_of_run(workdir: str):
    """(TwoTower module, tokenizer) of an image-text run (clip, siglip), or None for other methods.

    Built from the run's config.json as training builds them (the method's ``build_model``),
    with ``image_tower.init_from`` cleared: the checkpoint holds the image tower, so a LiT
    run's source need not exist any more. Raises TokenizerError (a ValueError) when the
    tokenizer's vocabulary file is gone.
    """
    from clrjax import methods
    from clrjax.data import tokenizers
    from clrjax.evaluation import restore

    if not storage.isfile(storage.join(workdir, restore.CONFIG_FILE)):
        return None  # not a run: restore.export_run says so
    config = restore.load_run_config(workdir)
    if not getattr(methods.get(config.method), "uses_text", False):
        return None
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.image_tower.init_from = ""
    model = methods.get(config.method).build_model(config, num_classes=1)  # the probe is not exported
    return model, tokenizers.get_tokenizer(config.text.to_dict())


def write_text_side(encoder, out: str, towers, requested) -> dict:
    """Adds the text tower, tokenizer and learned scalars to ``out`` (clrjax.export.write_image_text_files).

    ``encoder`` is what restore.export_run exported (its step and config); the rest of the
    two-tower parameters are read from the same checkpoint step. A non-image-text export
    into ``out`` removes the image-text files of an export it replaced.
    """
    import jax

    from clrjax import export as export_lib
    from clrjax.evaluation import restore

    if jax.process_index() == 0:  # restore.export_run has removed the encoder files of a replaced export
        export_lib.remove_image_text_files(out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("clrjax_image_text_files_removed")
    if towers is None:
        return {}
    formats = [f for f in (requested or export_lib.FORMATS) if f != "torch"]
    if not formats:
        logging.warning("export: --formats=torch writes the image encoder alone; the text tower is written in "
                        "the orbax and safetensors formats.")
        return {}
    model, tokenizer = towers
    checkpointer, step = restore.checkpoint_step(encoder.path, encoder.step)
    try:
        state = checkpointer.restore_subtree(step, keys=("params",))
    finally:
        checkpointer.close()
    variables = {"params": state["params"], "batch_stats": {"encoder": encoder.variables.get("batch_stats", {})}}
    return export_lib.write_image_text_files(
        out, encoder.model_cfg, model, variables, tokenizer, method=encoder.config.method,
        augment=encoder.config.augment.to_dict(), preprocessing=restore.preprocessing_of(encoder.config),
        formats=formats)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=cli.parse_flags)
