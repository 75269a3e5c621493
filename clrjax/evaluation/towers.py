"""The two towers of an image-text run, restored for ``experiments/zero_shot_eval.py``, and its result.

:func:`towers_from_workdir` is :func:`clrjax.evaluation.restore.from_workdir`
for a CLIP, SigLIP or LiT run (:func:`towers_from_export` the same for its
export, :func:`clrjax.export.load_image_text`): the same checks in the same order (checkpoint,
config, split), plus that the run is an image-text method and that the test
split has what each requested evaluation reads (class names for zero-shot,
captions for retrieval), all before anything is restored or compiled; then
the whole model's ``params`` and ``batch_stats`` (image tower, projections,
text tower, learned scalars) are read and checked against the model the
config builds. :func:`run_zero_shot_eval` computes the numbers with
:func:`clrjax.evaluation.zero_shot.zero_shot_metrics` and
:func:`~clrjax.evaluation.zero_shot.retrieval_metrics`, the functions the
final report and the periodic evaluators use, so the three agree by
construction and the tests check that they do.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence

import jax
import ml_collections
import numpy as np

from clrjax import methods, parallel, storage
from clrjax.checkpoint import CheckpointDamagedError, leaf_shapes
from clrjax.evaluation import restore, run_eval, zero_shot
from clrjax.evaluation.protocols import eval_mesh
from clrjax.evaluation.restore import EvalInputError

ZERO_SHOT_EVAL_FILE = "zero_shot_eval.json"
EVALUATIONS = ("zero_shot", "retrieval")
TOWER_STATE_KEYS = restore.ENCODER_STATE_KEYS  # the whole model's params and batch_stats


@dataclasses.dataclass
class TwoTowers:
    """A restored two-tower model and what to evaluate it on.

    Has the attributes of :class:`~clrjax.evaluation.restore.FrozenEncoder` that
    :func:`~clrjax.evaluation.run_eval.provenance` and
    :func:`~clrjax.evaluation.restore.output_dir` read, so results name their checkpoint alike.
    """
    model: Any                     # clrjax.methods.image_text.TwoTower
    variables: Dict[str, Any]      # {'params', 'batch_stats'} of the whole model, host arrays
    config: ml_collections.ConfigDict
    model_cfg: Dict[str, Any]      # the image tower's resolved config
    test_source: Any
    origin: str
    path: str
    step: Optional[int]
    network: str = "online"
    tokenizer: Any = None          # an export's own (its vocabulary copy); None: config.text's


def check_image_text_method(config, where: str) -> None:
    """Raises unless ``config.method`` has a text tower."""
    try:
        method = methods.get(config.method)
    except ValueError as err:
        raise EvalInputError(f"{where}: config.method is {config.method!r}, which is unknown ({err}).") from None
    if not getattr(method, "uses_text", False):
        raise EvalInputError(
            f"{where} is a {config.method} run, which has no text tower; zero-shot and retrieval need an image-text "
            "run (clip or siglip, LiT included): pass one, or evaluate this encoder with experiments/linear_eval.py "
            "or experiments/knn_eval.py.")


def select_evaluations(test_source, requested: Sequence[str], config) -> tuple:
    """The evaluations to run: ``requested``, each checked against the test split, or (empty) every
    one the test split supports (at least one)."""
    problems = {"zero_shot": zero_shot.zero_shot_problem(test_source),
                "retrieval": zero_shot.retrieval_problem(test_source)}
    unknown = [name for name in requested if name not in EVALUATIONS]
    if unknown:
        raise EvalInputError(f"--evaluations has {unknown[0]!r}; use zero_shot, retrieval or both.")
    split = f"the test split {config.dataset.test_split!r} of {config.dataset.name}"
    for name in requested:
        if problems[name]:
            others = [n for n in EVALUATIONS if n != name and not problems[n]]
            fix = f"pass --evaluations={others[0]}" if others else "set --config.dataset.test_split to a split that has them"
            raise EvalInputError(f"--evaluations asks for {name} but {split} {problems[name]}; {fix}.")
    chosen = tuple(dict.fromkeys(requested)) or tuple(name for name in EVALUATIONS if not problems[name])
    if not chosen:
        raise EvalInputError(f"{split} {problems['zero_shot']} and {problems['retrieval']}; set "
                             "--config.dataset.test_split (or --config.dataset.*) to a labelled or captioned split.")
    return chosen


def _check_tower_variables(model, variables, config, what: str, without_probe: bool = False) -> None:
    """Raises unless ``variables`` have the names and shapes ``model`` has (traced, not run);
    ``without_probe``: an export, which keeps no online probe."""
    shape = restore.model_input_shape(config)
    dummy = jax.ShapeDtypeStruct((1,) + tuple(shape), np.float32)
    expected = leaf_shapes(dict(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)),
                           sep="/")
    if without_probe:
        expected = {k: v for k, v in expected.items() if not k.startswith("params/probe/")}
    got = leaf_shapes(dict(variables), sep="/")
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if wrong:
        problem = f"{wrong[0]} has shape {got[wrong[0]]} but the config's model expects {expected[wrong[0]]}"
    elif missing or extra:
        problem = f"its variables {'lack ' + missing[0] if missing else 'have an extra ' + extra[0]}"
    else:
        return
    raise EvalInputError(f"{what}: {problem}; use the config the run was trained with (drop --config).")


def towers_from_workdir(workdir: str, config=None, step: Optional[int] = None,
                        evaluations: Sequence[str] = ()) -> tuple:
    """(TwoTowers, evaluations to run) of an image-text run's checkpoint (latest unless ``step``).

    Every check a user can fail raises :class:`EvalInputError` before the
    checkpoint's arrays are read (module docstring).
    """
    checkpointer, step = restore.checkpoint_step(workdir, step)
    try:
        config = restore.load_run_config(workdir) if config is None else restore.check_config(config)
        check_image_text_method(config, f"--workdir={workdir}")
        test_source = restore.load_split(config, "test_split")
        chosen = select_evaluations(test_source, evaluations, config)
        try:
            state = checkpointer.restore_subtree(step, keys=TOWER_STATE_KEYS)
        except CheckpointDamagedError as err:
            others = ", ".join(str(s) for s in checkpointer.all_steps() if s != step) or "none"
            raise EvalInputError(f"{err} (the run's other steps: {others}; pass one with --step)") from None
    finally:
        checkpointer.close()
    variables = {k: v for k, v in (("params", state.get("params")), ("batch_stats", state.get("batch_stats")))
                 if v}
    probe = variables.get("params", {}).get("probe", {}).get("dense", {}).get("kernel")
    num_classes = int(probe.shape[1]) if probe is not None else int(test_source.num_classes)
    model = _model_of(config, num_classes)
    _check_tower_variables(model, variables, config,
                           f"the checkpoint {checkpointer.directory}/{step} does not fit config.model/config.text_tower")
    from clrjax import models
    towers = TwoTowers(model, variables, config, models.resolve_model_config(config.model.to_dict()), test_source,
                       "workdir", storage.absolute(workdir), step)
    return towers, chosen


def _model_of(config, num_classes: int):
    """The run's TwoTower; the weights come from the checkpoint or export, so the image tower's
    ``init_from`` (LiT) is not read again and need not exist any more."""
    model_config = ml_collections.ConfigDict(config.to_dict())
    model_config.image_tower.init_from = ""
    return methods.get(config.method).build_model(model_config, num_classes)


def towers_from_export(path: str, config=None, evaluations: Sequence[str] = ()) -> tuple:
    """(TwoTowers, evaluations to run) of an image-text export (``experiments/export.py`` of a clip or
    siglip run: its directory or ``image_text.safetensors``), loaded by
    :func:`clrjax.export.load_image_text`, evaluated per the training config it records (or ``config``)."""
    from clrjax import export as export_lib

    path = storage.absolute(path)
    restore.check_export_path(path)
    provenance = restore.read_export_source(path)
    config = restore.recorded_config(path, provenance) if config is None else restore.check_config(config)
    check_image_text_method(config, f"--encoder={path}")
    test_source = restore.load_split(config, "test_split")
    chosen = select_evaluations(test_source, evaluations, config)
    try:
        loaded = export_lib.load_image_text(path, dtype=None)  # the run's dtypes, as --workdir computes
    except ValueError as err:
        raise EvalInputError(str(err)) from None
    restore.check_preprocessing(loaded.preprocessing, config, path)
    variables = jax.tree.map(np.asarray, loaded.variables)
    # The export stores the learned scalars (logit_scale; log_t, bias) as 1-element arrays; the model's are ().
    variables["params"] = {k: (v.reshape(()) if isinstance(v, np.ndarray) and v.size == 1 else v)
                           for k, v in variables["params"].items()}
    model = _model_of(config, int(test_source.num_classes))
    _check_tower_variables(model, variables, config, f"the export {path} does not fit config.model/config.text_tower",
                           without_probe=True)
    towers = TwoTowers(model, variables, config, loaded.model_cfg, test_source, "export", path,
                       provenance.get("step"), tokenizer=loaded.tokenizer)
    return towers, chosen


def towers_from_flags(workdir: Optional[str], encoder: Optional[str], config, step: Optional[int],
                      evaluations: Sequence[str] = ()) -> tuple:
    """:func:`towers_from_workdir` or :func:`towers_from_export`, as the evaluation programs' flags name them."""
    if bool(workdir) == bool(encoder):
        raise EvalInputError("pass exactly one of --workdir=RUN (an image-text run: clip or siglip) or "
                             "--encoder=EXPORT_DIR (its export made by experiments/export.py).")
    if workdir:
        return towers_from_workdir(workdir, config, step, evaluations)
    if step is not None:
        raise EvalInputError("--step selects a checkpoint of --workdir; an export has one model, drop --step.")
    return towers_from_export(encoder, config, evaluations)


def run_zero_shot_eval(towers: TwoTowers, evaluations: Sequence[str] = EVALUATIONS, *,
                       templates: Sequence[str] = (), block_size: Optional[int] = None, mesh=None,
                       progress: bool = False) -> dict:
    """``{'zero_shot': {top1, top5, templates, ...}, 'retrieval': {i2t_r1, ..., t2i_r10, ...}}``
    (the requested ones), each entry with :func:`~clrjax.evaluation.run_eval.provenance`."""
    for template in templates:
        problem = zero_shot.template_problem(template)
        if problem:
            raise EvalInputError(f"--template={template!r} {problem}, e.g. --template='a photo of a {{}}.'.")
    if block_size is not None and block_size < 1:
        raise EvalInputError(f"--block_size={block_size} must be a positive number of texts, e.g. 4096.")
    mesh = mesh or eval_mesh()
    variables = parallel.replicate(towers.variables, mesh)
    ts = zero_shot.tower_set(zero_shot.tower_fns(towers.model, towers.config.augment.to_dict()), variables,
                             towers.test_source, towers.config, mesh, progress=progress, tokenizer=towers.tokenizer)
    info = dict(run_eval.provenance(towers), num_test=int(len(ts.labels)))
    results: Dict[str, Any] = {}
    if "zero_shot" in evaluations:
        metrics = zero_shot.zero_shot_metrics(ts, templates)
        results["zero_shot"] = dict({k[len("zero_shot_"):]: v for k, v in metrics.items()},
                                    templates=list(zero_shot.templates_of(ts.source, templates)),
                                    num_classes=int(len(ts.source.class_names)), **info)
    if "retrieval" in evaluations:
        block = int(block_size or zero_shot.RETRIEVAL_BLOCK)
        metrics = zero_shot.retrieval_metrics(ts, block_size=block)
        results["retrieval"] = dict({k[len("retrieval_"):]: v for k, v in metrics.items()},
                                    block_size=block, **info)
    return results


def format_line(results: Dict[str, Any], path: str) -> str:
    """One console line: zero-shot top-1/top-5, retrieval R@1/5/10 both ways, what was evaluated, where."""
    parts = []
    if "zero_shot" in results:
        r = results["zero_shot"]
        parts.append(f"zero-shot top-1 {r['top1']:.4f} top-5 {r['top5']:.4f} ({len(r['templates'])} templates)")
    if "retrieval" in results:
        r = results["retrieval"]
        for way, name in (("i2t", "image->text"), ("t2i", "text->image")):
            parts.append(f"{name} R@1/5/10 " + "/".join(f"{r[f'{way}_r{k}']:.4f}" for k in zero_shot.RETRIEVAL_KS))
    first = next(iter(results.values()))
    return f"{' | '.join(parts)} | {run_eval._what(first)} -> {path}"


__all__ = ["TwoTowers", "towers_from_workdir", "towers_from_export", "towers_from_flags", "run_zero_shot_eval", "format_line",
           "select_evaluations", "check_image_text_method", "ZERO_SHOT_EVAL_FILE", "EVALUATIONS"]
