"""experiments/zero_shot_eval.py and the periodic evaluators zero_shot and retrieval, on a tiny CLIP run.

One 4-step CLIP run on digits (class-name captions) logs both evaluators at steps 2 and 4 and
gets the final report. Checked: the program's JSON equals the final report for the last
checkpoint (the report computes from the in-memory state, the program from the restored
checkpoint, in another process); the logged step-2 values equal a direct evaluation of the
step-2 checkpoint; and the program's numbers equal float64 NumPy scoring written from the
definitions (CLIP sec. 3.1.4 prompt ensembling; Recall@k with ties against the pair) on tower
outputs computed here without clrjax.evaluation, for templates given on the command line and a
retrieval block size that does not divide the split.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import methods, metrics as metrics_lib, parallel, train
from clrjax.checkpoint import Checkpointer
from clrjax.data import augment, captions, class_captions, sources, tokenizers
from clrjax.evaluation import protocols, run_eval, towers as towers_lib, zero_shot
from clrjax.evaluation.restore import EvalInputError
from tests.evaluation.test_image_text_eval import _rank_recall, _unit
from tests.methods.test_harness import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGRAM = os.path.join(ROOT, "experiments", "zero_shot_eval.py")
EVALS = {"evals.zero_shot.every_steps": 2, "evals.retrieval.every_steps": 2}


def _config():
    return tiny_config("clip", **EVALS, **{"checkpoint.every_steps": 2, "checkpoint.keep": 5, "log_every_steps": 2,
                                           "eval.compare_random_init": False, "eval.knn_k": (5,)})


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """(workdir, final report) of a finished 4-step CLIP run with both evaluators every 2 steps."""
    workdir = str(tmp_path_factory.mktemp("clip"))
    result = train.train(_config(), workdir)
    # The final report's image-text part (run_eval.evaluate_encoder calls it; its probes are not needed here).
    mesh = protocols.eval_mesh()
    variables = parallel.replicate(run_eval.variables_of(result.state), mesh)
    return workdir, zero_shot.image_text_report(result.exp.model, variables, result.exp.config, mesh)


def _reference(workdir, step, templates):
    """Zero-shot and retrieval of checkpoint ``step``: tower outputs on one device (model rebuilt from
    the config, the checkpoint read by Checkpointer alone), projections and scoring in float64."""
    config = _config()
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    state = checkpointer.restore_subtree(step)
    checkpointer.close()
    variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
    model = methods.get("clip").build_model(config, 10)
    source = sources.load_source(config.dataset.to_dict(), "test")
    rows = source[np.arange(len(source))]
    x = augment.preprocess_eval(jnp.asarray(rows["image"]), config.augment.to_dict())
    h = np.asarray(jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, x), np.float64)
    img = h @ np.asarray(variables["params"]["image_projection"]["kernel"], np.float64)
    tok = tokenizers.get_tokenizer(config.text.to_dict())

    def text(strings):
        t = jnp.asarray(tok.encode_batch(strings, config.text.context_length))
        h = jax.jit(lambda v, t: model.apply(v, t, method=lambda m, t: m.text_encoder(t)))(variables, t)
        return np.asarray(h, np.float64) @ np.asarray(variables["params"]["text_projection"]["kernel"], np.float64)

    classes = _unit(np.stack([_unit(text([t.format(c) for t in templates])).mean(0)
                              for c in class_captions.DIGIT_NAMES]))
    s = _unit(img) @ classes.T
    labels = rows["label"]
    better = np.array([np.sum(s[i] > s[i, labels[i]]) for i in range(len(labels))])
    ids = np.arange(len(labels))
    texts = text(captions.choose(source.captions_of(ids), config.seed, 0, ids))  # the pipeline's epoch-0 pick
    return ({"top1": np.mean(better < 1), "top5": np.mean(better < 5)},
            _rank_recall(_unit(img) @ _unit(texts).T, (1, 5, 10)), len(labels))


def test_program_json_equals_the_final_report(clip_run, tmp_path):
    workdir, report = clip_run
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, PROGRAM, f"--workdir={workdir}", f"--out={tmp_path}", "--progress=false"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "zero-shot top-1" in lines[0] and "image->text R@1/5/10" in lines[0], lines
    assert "step 4" in lines[0] and towers_lib.ZERO_SHOT_EVAL_FILE in lines[0]
    saved = json.load(open(tmp_path / towers_lib.ZERO_SHOT_EVAL_FILE))
    assert set(saved) == {"zero_shot", "retrieval"}  # both: digits_captions has class names and captions
    got = {f"zero_shot_{k}": saved["zero_shot"][k] for k in ("top1", "top5")}
    got.update({f"retrieval_{w}_r{k}": saved["retrieval"][f"{w}_r{k}"] for w in ("i2t", "t2i") for k in (1, 5, 10)})
    for key, value in got.items():
        # Same devices, same compiled programs, same weights: the same number (no tolerance).
        assert value == report[key], (key, value, report[key])
    assert saved["zero_shot"]["templates"] == list(class_captions.TEMPLATES)  # the dataset's own
    assert saved["retrieval"]["step"] == 4 and "zero_shot_eval.py" in saved["retrieval"]["command"]


def test_periodic_values_equal_a_direct_evaluation_of_the_checkpoint(clip_run):
    workdir, report = clip_run
    by_step = {r["step"]: r for r in metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))}
    names = ["zero_shot_top1", "zero_shot_top5"] + [f"retrieval_{w}_r{k}" for w in ("i2t", "t2i")
                                                     for k in (1, 5, 10)]
    assert all(name in by_step[2] and name in by_step[4] for name in names)
    towers, chosen = towers_lib.towers_from_workdir(workdir, step=2)
    assert chosen == ("zero_shot", "retrieval")
    direct = towers_lib.run_zero_shot_eval(towers, chosen)
    for name in names:
        kind, _, key = name.partition("_") if name.startswith("retrieval") else ("zero_shot", "", name[10:])
        assert by_step[2][name] == direct[kind][key], name
        assert by_step[4][name] == report[name], name  # the last evaluation is the final report's


def test_program_numbers_equal_numpy_with_given_templates_and_blocks(clip_run):
    workdir, _ = clip_run
    templates = ("a photo of the number {}.", "{}")
    towers, chosen = towers_lib.towers_from_workdir(workdir)
    got = towers_lib.run_zero_shot_eval(towers, chosen, templates=templates, block_size=7)
    want_zs, want_ret, n = _reference(workdir, 4, templates)
    assert got["zero_shot"]["templates"] == list(templates) and got["retrieval"]["block_size"] == 7
    # float32 towers vs float64 scoring: a near-tie may flip one example (1/n)
    for key, value in want_zs.items():
        assert abs(got["zero_shot"][key] - value) <= 1 / n + 1e-9, (key, got["zero_shot"][key], value)
    for key, value in want_ret.items():
        assert abs(got["retrieval"][key] - value) <= 1 / n + 1e-9, (key, got["retrieval"][key], value)
    assert 0 < got["zero_shot"]["top5"] < 1 and got["retrieval"]["i2t_r1"] < got["retrieval"]["i2t_r10"]


def test_an_image_text_export_gives_the_final_report(clip_run, tmp_path):
    from clrjax import export as export_lib
    from clrjax.evaluation import restore

    workdir, report = clip_run
    towers, chosen = towers_lib.towers_from_workdir(workdir)
    config = towers.config
    export_lib.export_image_text(str(tmp_path), towers.model_cfg, towers.model, towers.variables,
                                 tokenizers.get_tokenizer(config.text.to_dict()), method="clip",
                                 augment=config.augment.to_dict(), preprocessing=restore.preprocessing_of(config),
                                 formats=("orbax", "safetensors"))
    for path in (str(tmp_path), str(tmp_path / export_lib.IMAGE_TEXT_SAFETENSORS_FILE)):
        exported, chosen = towers_lib.towers_from_flags(None, path, _config(), None)
        assert exported.origin == "export" and "params/probe" not in str(list(exported.variables["params"]))
        got = towers_lib.run_zero_shot_eval(exported, chosen)
        for key, value in report.items():
            kind, _, name = key.partition("_shot_") if key.startswith("zero") else key.partition("_")
            assert got["zero_shot" if kind == "zero" else kind][name] == value, (path, key)
    with pytest.raises(EvalInputError, match=r"--step selects a checkpoint of --workdir; an export has one model"):
        towers_lib.towers_from_flags(None, str(tmp_path), _config(), 4)


class _Split:
    """A test split stand-in with or without class names and captions."""

    def __init__(self, class_names=(), has_captions=False):
        self.class_names, self.has_captions, self.num_classes = tuple(class_names), has_captions, 2


def test_evaluations_follow_what_the_test_split_has():
    config = _config()
    both, names_only, captions_only = _Split(("a", "b"), True), _Split(("a", "b")), _Split((), True)
    assert towers_lib.select_evaluations(both, (), config) == ("zero_shot", "retrieval")
    assert towers_lib.select_evaluations(names_only, (), config) == ("zero_shot",)
    assert towers_lib.select_evaluations(captions_only, [], config) == ("retrieval",)
    with pytest.raises(EvalInputError, match=r"--evaluations asks for zero_shot but the test split 'test' of "
                       r"digits_captions has no class names, .*; pass --evaluations=retrieval\."):
        towers_lib.select_evaluations(captions_only, ["zero_shot"], config)
    with pytest.raises(EvalInputError, match=r"asks for retrieval but .* has no captions, .*--evaluations=zero_shot"):
        towers_lib.select_evaluations(names_only, ["retrieval"], config)
    with pytest.raises(EvalInputError, match=r"has no class names, .* and has no captions"):
        towers_lib.select_evaluations(_Split(), (), config)


def test_templates_need_one_placeholder(clip_run):
    assert zero_shot.template_problem("a photo of a {}.") is None
    assert "exactly once" in zero_shot.template_problem("a photo")
    assert "exactly once" in zero_shot.template_problem("{} and {}")
    assert "other braces" in zero_shot.template_problem("a {} {x}")
    towers, chosen = towers_lib.towers_from_workdir(clip_run[0])
    with pytest.raises(EvalInputError, match=r"--template='a photo' must hold \{\} exactly once"):
        towers_lib.run_zero_shot_eval(towers, chosen, templates=("a photo",))


def test_periodic_evaluators_need_what_the_test_split_has():
    from clrjax.evaluation import periodic

    config = _config()
    assert periodic.data_problem(config, _Split(("a", "b"), True)) is None
    problem = periodic.data_problem(config, _Split((), True))
    assert problem.startswith("config.evals.zero_shot.every_steps is 2 but the test split 'test' of "
                              "digits_captions has no class names"), problem
    assert "set --config.evals.zero_shot.every_steps=0" in problem
    assert "retrieval" in periodic.data_problem(config, _Split(("a", "b"), False))
