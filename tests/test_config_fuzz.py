"""Fuzzing the config: every field gets wrong types, zeros, negatives, huge and empty values.

Each drawn value must either validate, or fail ``validate_config`` with a one-line
:class:`ConfigError` naming the field: never another exception, never a traceback, never a
hang. Values that validate are then built and traced (``build_experiment``, ``jax.eval_shape``
of the initial state and of the train step: nothing is compiled or run), so a value the
validator lets through cannot fail at the first step either. A few drawn values also go
through ``experiments/train.py``, which must exit 3 with one line on stderr.

The draws come from ``random.Random(SEED)``: a failure is reproducible (the test id and the
message name the field and the value). The field ranges are clrjax/config.py ``FIELD_SPECS``
and ``LOSS_SPECS``; the bounds are documented in docs/BAD_INPUT.md ("Field ranges").
"""
import math
import os
import random
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from clrjax import config as config_lib
from clrjax import methods
from tests.test_bad_input import with_value as _with  # any type: a plain dict round trip skips type checks
from tests.xla_env import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 17
OPEN_SECTIONS = ("loss", "model")
# Where each encoder family's fields are fuzzed (validation only: no data is read).
MODEL_PRESETS = {"cnn_small": "simclr.py:digits", "resnet18": "simclr.py:cifar10,encoder=resnet18",
                 "vit_tiny": "simclr.py:cifar10,encoder=vit_tiny"}
TRACED_DRAWS = 3      # accepted draws that are built and traced (about 0.5-1 s each on 2 CPU cores)
# Values at the edges of their ranges, built and traced with the drawn ones.
BOUNDARY_VALUES = (("projector.hidden_dims", ()), ("loss.chunk_size", 1), ("augment.std", (1.0,)))
CLI_RUNS = 2          # drawn values run through experiments/train.py (about 2.5 s each)
ACCEPTED: list = []   # (field, value) of the digits-preset draws that validated, filled by the fuzz test


def _load(spec: str):
    return config_lib.load_config_file(os.path.join(ROOT, "configs", spec))


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict) and not (not prefix and key in OPEN_SECTIONS and not value):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# --------------------------------------------------------------------------- the draws


def draws(rng: random.Random, default):
    """(category, value) pairs: one random value of each kind a user or a config.json can give."""
    n = rng.randint(1, 10**6)
    wrong = [None, {"value": n}, f"bad value {n}", rng.choice([True, False]), [f"x{n}"]]
    if isinstance(default, bool):
        wrong.append(rng.choice([0, 1]))
    elif isinstance(default, int):
        wrong.append(n + 0.5)
    elif isinstance(default, (tuple, list)):
        wrong.append(n)
    out = [("wrong type", v) for v in rng.sample(wrong, 3)]
    out += [("wrong type", {"value": n})]  # no field takes a dict
    out += [("zero", rng.choice([0, 0.0]))]
    out += [("negative", rng.choice([-n, -rng.random() * 10 ** rng.randint(0, 6)]))]
    out += [("huge", rng.choice([10 ** rng.randint(10, 40), 1e300, math.inf, math.nan]))]
    out += [("empty", rng.choice(["", (), []]))]
    if isinstance(default, (tuple, list)):
        out += [("bad element", tuple(rng.choice([0, -1, 10**12, math.nan, "x"]) for _ in range(max(1, len(default)))))]
    return out


def _fields(config, prefix_filter=None):
    """(field, default) of every leaf of ``config``, or of the leaves under ``prefix_filter``."""
    fields = list(_leaves(config.to_dict()))
    if prefix_filter is None:
        return [(f, v) for f, v in fields if f.split(".")[0] not in OPEN_SECTIONS]
    return [(f, v) for f, v in fields if f.startswith(prefix_filter + ".")]


def _named(field: str) -> tuple:
    """The names a message about ``field`` may start from (an encoder field: its section or the crop size)."""
    if field.startswith("model."):
        return (f"config.{field}", "config.model ", "config.augment.crop_size")
    return (f"config.{field}",)


def _outcome(config, field):
    """None when ``config`` validates, else the ConfigError message; any other exception fails the test."""
    try:
        config_lib.validate_config(config, num_devices=8)
    except config_lib.ConfigError as err:
        message = str(err)
        assert "\n" not in message, f"{field}: a message of several lines: {message!r}"
        assert any(name in message for name in _named(field)), f"{field}: the message does not name it: {message}"
        return message
    return None


def _cases():
    """(test id, base config spec, field, default) of every fuzzed field."""
    cases = [("base", "simclr.py:digits", f, d) for f, d in _fields(_load("simclr.py:digits"))]
    for method in methods.METHODS.names():
        spec = f"{method}.py:digits"
        cases += [(method, spec, f, d) for f, d in _fields(_load(spec), "loss")]
    for encoder, spec in MODEL_PRESETS.items():
        cases += [(encoder, spec, f, d) for f, d in _fields(_load(spec), "model") if f != "model.name"]
    cases.append(("base", "simclr.py:digits", "model.name", "cnn_small"))
    for section in ("dataset", "optimizer", "loss", "model", "evals"):   # a value where a section belongs
        cases.append(("base", "simclr.py:digits", section, {}))
    return cases


CASES = _cases()


# --------------------------------------------------------------------------- the table covers base_config


def test_every_field_of_base_config_has_a_range():
    fields = [f for f, _ in _leaves(config_lib.base_config().to_dict()) if f.split(".")[0] not in OPEN_SECTIONS]
    missing = [f for f in fields if isinstance(config_lib.field_spec(f), config_lib.Like)]
    assert not missing, f"base_config fields without a FIELD_SPECS entry (add one in clrjax/config.py): {missing}"
    stale = [f for f in config_lib.FIELD_SPECS if "*" not in f and f not in fields]
    assert not stale, f"FIELD_SPECS entries that are not fields of base_config: {stale}"


def test_every_loss_keyword_of_every_method_has_a_range():
    missing = sorted({f"{name}: {key}" for name in methods.METHODS.names()
                      for key in methods.get(name).loss_kwarg_defaults() if key not in config_lib.LOSS_SPECS})
    assert not missing, f"loss keywords without a LOSS_SPECS entry (add one in clrjax/config.py): {missing}"


# --------------------------------------------------------------------------- in process: every field


@pytest.mark.parametrize("family,spec,field,default", CASES, ids=[f"{c[0]}:{c[2]}" for c in CASES])
def test_drawn_values_validate_or_fail_with_one_line_naming_the_field(family, spec, field, default):
    rng = random.Random(f"{SEED}:{family}:{field}")
    base = _load(spec)
    for category, value in draws(rng, default):
        message = _outcome(_with(base, field, value), field)
        if message is None and spec == "simclr.py:digits":
            ACCEPTED.append((field, value))
        if category == "wrong type" and isinstance(value, dict) or (
                isinstance(value, float) and not math.isfinite(value) and not isinstance(default, str)):
            # No field takes a dict; no number field takes nan or inf.
            assert message is not None, f"config.{field}={value!r} ({category}) was accepted"


def _accepted_draws():
    """(field, value) of drawn values that validate on the digits preset, in a seeded random order."""
    accepted = list(ACCEPTED)
    if not accepted:  # this test alone: draw them here
        for family, spec, field, default in CASES:
            if spec == "simclr.py:digits":
                base = _load(spec)
                accepted += [(field, v) for _, v in draws(random.Random(f"{SEED}:{family}:{field}"), default)
                             if _outcome(_with(base, field, v), field) is None]
    random.Random(SEED).shuffle(accepted)
    return accepted


def test_accepted_values_build_and_trace_without_compiling():
    """What validates also builds (data opened, optimizer made) and traces the first step."""
    from clrjax import train
    from clrjax.data import sources
    from tests.test_bad_input import tiny

    chosen, traced = list(BOUNDARY_VALUES), 0
    for field, value in _accepted_draws():
        if len(chosen) >= len(BOUNDARY_VALUES) + TRACED_DRAWS:
            break
        try:  # the draw validated on the preset; the tiny config may refuse it (e.g. a batch it cannot split)
            config_lib.validate_config(_with(tiny(), field, value), num_devices=8)
            chosen.append((field, value))
        except config_lib.ConfigError:
            pass
    for field, value in chosen:
        config = _with(tiny(), field, value)
        try:
            exp = train.build_experiment(config)
        except (config_lib.ConfigError, sources.DataError) as err:  # found with the data: one line is enough
            assert "\n" not in str(err), f"{field}={value!r}: {err!r}"
            continue
        try:
            state = jax.eval_shape(lambda: train.init_train_state(exp))
            b, (h, w, c) = config.batch_size, exp.image_shape
            batch = {"image": jax.ShapeDtypeStruct((b, h, w, c), jnp.uint8),
                     "label": jax.ShapeDtypeStruct((b,), jnp.int32), "index": jax.ShapeDtypeStruct((b,), jnp.int32)}
            jax.eval_shape(train.make_train_step(exp, jit=False), state, batch)
            traced += 1
        except Exception as err:  # noqa: BLE001 - the point: the validator let this value through
            pytest.fail(f"config.{field}={value!r} validates but the first step cannot be traced: "
                        f"{type(err).__name__}: {str(err)[:500]}")
    assert traced >= len(BOUNDARY_VALUES), chosen


# --------------------------------------------------------------------------- through the CLI


def _flag_text(value):
    if isinstance(value, tuple):
        return "(" + ",".join(repr(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, float) else str(value)


def _cli_draws():
    """CLI_RUNS (field, value) drawn values that fail in process and read back the same from a flag."""
    rng = random.Random(SEED)
    base = _load("simclr.py:digits")
    pool = []
    for family, spec, field, default in CASES:
        if family != "base" or field.split(".")[0] in OPEN_SECTIONS or isinstance(default, (bool, dict)):
            continue
        for _, value in draws(random.Random(f"{SEED}:{family}:{field}"), default):
            same_type = (type(value) is type(default) if not isinstance(default, tuple) else
                         isinstance(value, tuple) and value and all(isinstance(v, (int, float)) and
                                                                    not isinstance(v, bool) for v in value))
            if isinstance(default, float) and isinstance(value, float) or same_type:
                if not (isinstance(value, str) and (not value or " " in value)):
                    if _outcome(_with(base, field, value), field) is not None:  # must fail: nothing trains
                        pool.append((field, value))
    return rng.sample(pool, CLI_RUNS)


@pytest.mark.parametrize("field,value", _cli_draws(), ids=lambda x: str(x)[:40])
def test_cli_drawn_bad_value_exits_3_with_one_line(tmp_path, field, value):
    env = dict(os.environ, XLA_FLAGS=xla_flags(2), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "train.py"),
                           "--config=" + os.path.join(ROOT, "configs", "simclr.py") + ":digits",
                           f"--workdir={tmp_path / 'run'}", f"--config.{field}={_flag_text(value)}"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines()
             if ln.strip() and not (ln[:1] in "IWEF" and ln[1:5].isdigit()) and not ln.startswith("WARNING:")]
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-2000:]
    assert f"config.{field}" in lines[0] or f"--config.{field}" in lines[0], lines[0]
    assert not (tmp_path / "run").exists()
