"""What the absl programs in ``experiments/`` share: exit codes, flag parsing and checks, errors, eval flags.

Every program ends a user error with one line on stderr, naming what was wrong and how to fix
it, and a distinct exit status (no traceback):

* 0 done; 1 unexpected error (traceback);
* 3 bad input: flags, config, data, workdir, checkpoint or output directory (:data:`EXIT_BAD_INPUT`),
  found before anything is compiled (program flags before anything is loaded);
* 4 non-finite values stopped training; 5 a checkpoint could not be written;
* 6 a result file could not be written after the work was done (disk full, the directory
  removed meanwhile): the result is lost, re-run (:data:`EXIT_RESULT_WRITE`);
* 75 (``EX_TEMPFAIL`` of sysexits.h) stopped by SIGTERM/preemption after saving: re-run to resume.

Flags are checked at the start of ``main`` (:func:`check_flags`, :func:`check_output_dir`);
a tuple config field given twice on the command line is an error (ml_collections would join the
values into one tuple, ``(32,)`` then ``(64,)`` giving ``(32, 64)``): give it once.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import sys
import tempfile
from typing import Any, Callable, NoReturn, Optional, Sequence

from absl import flags

from clrjax import storage

EXIT_BAD_INPUT = 3
EXIT_NONFINITE = 4
EXIT_CHECKPOINT_WRITE = 5
EXIT_RESULT_WRITE = 6
EXIT_PREEMPTED = 75

CONFIG_HINT = ("check --config=FILE:PRESET and the --config.<field> names and values; every field is listed "
               "in clrjax/config.py base_config")


def fail(program: str, message: Any, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Prints ``program: message`` on stderr (one line) and exits with ``status``."""
    text = " ".join(str(message).split("\n"))
    print(f"{program}: {text}", file=sys.stderr, flush=True)
    sys.exit(status)


def flag_error_text(err: Exception) -> str:
    """One line from an absl/ml_collections flag error, which may embed a traceback or a repr."""
    if isinstance(err, (KeyError, AttributeError)):  # an override names a field the config lacks
        text = str(err.args[0] if err.args else err).replace("\\'", "'").replace("\\n", "\n").strip("'\" ")
        first, _, rest = text.partition("\n")
        return f"unknown config field '{first.strip(chr(39))}'. {rest.strip()}".strip()
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    if len(lines) > 1 and any(ln.startswith("Traceback") for ln in lines):  # the config file raised
        return f"{lines[0].split(': ')[0]}: {lines[-1]}"
    return " ".join(lines)


def config_file_arg(argv) -> str | None:
    """The FILE of ``--config=FILE[:ARG]`` (or ``--config FILE[:ARG]``) in ``argv``, if any."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg[len("--config="):].partition(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].partition(":")[0]
    return None


def repeated_tuple_fields(argv, flag_values=None) -> dict:
    """``{flag name: [values]}`` of the tuple config fields (ml_collections multi-flags) given more than once.

    ml_collections joins repeated tuple overrides into one tuple; every other flag keeps its last value.
    """
    flag_values = flags.FLAGS if flag_values is None else flag_values
    given: dict = {}
    args = list(argv)
    for i, arg in enumerate(args):
        if arg == "--":
            break
        if not arg.startswith("--") or "." not in arg.partition("=")[0]:
            continue
        name, eq, value = arg[2:].partition("=")
        if not eq and i + 1 < len(args):
            value = args[i + 1]
        given.setdefault(name, []).append(value)
    return {name: values for name, values in given.items()
            if len(values) > 1 and name in flag_values and isinstance(flag_values[name], flags.MultiFlag)}


def parse_flags(argv):
    """absl flag parsing (``app.run(main, flags_parser=parse_flags)``) whose errors end in one line
    and exit 3 instead of a traceback or a usage dump."""
    path = config_file_arg(argv[1:])
    if path is not None and not os.path.isfile(path):
        fail("config error", f"the config file {path!r} does not exist (relative to {os.getcwd()}); "
             "pass e.g. --config=configs/simclr.py:digits.")
    try:
        remaining = flags.FLAGS(argv)
        # ml_collections defers a config file's load errors to the config's first use.
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            flags.FLAGS["config"].value.keys()
    except Exception as err:  # flags.Error; ml_collections' AttributeError, KeyError, TypeError, OSError
        text = flag_error_text(err)
        if isinstance(err, (KeyError, AttributeError)) or "config" in text:
            fail("config error", f"{text} ({CONFIG_HINT})")
        fail("flag error", f"{text} (see --helpfull for the flags)")
    for name, values in repeated_tuple_fields(argv[1:]).items():
        joined = tuple(flags.FLAGS[name].value)
        fail("config error", f"--{name} is given {len(values)} times ({' then '.join(values)}), which ml_collections "
             f"would join into {joined!r}; give a tuple field once with all its values, e.g. "
             f"--{name}='{values[-1]}'")
    return remaining


# --------------------------------------------------------------------------- program flags


@dataclasses.dataclass(frozen=True)
class Rule:
    """What flag ``name`` accepts: ``ok(value)``; ``must`` completes "--name=value must ..."."""
    name: str
    ok: Callable[[Any], bool]
    must: str


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_int(v) -> Optional[int]:
    """An int flag value or list element ("12" from a list flag), else None."""
    if _is_int(v):
        return int(v)
    try:
        return int(str(v).strip()) if str(v).strip().lstrip("+-").isdigit() else None
    except ValueError:
        return None


def int_at_least(name: str, lo: int, what: str = "") -> Rule:
    must = ("be a positive integer" if lo == 1 else f"be a whole number >= {lo}") + (f" ({what})" if what else "")
    return Rule(name, lambda v: _as_int(v) is not None and _as_int(v) >= lo, must)


def ints_at_least(name: str, lo: int, what: str = "", allow_empty: bool = False) -> Rule:
    """A list flag of whole numbers >= lo (``--ks=20,200``)."""
    kind = "positive integers" if lo == 1 else f"whole numbers >= {lo}"
    must = f"be a comma-separated list of {kind}" + (f" ({what})" if what else "")
    return Rule(name, lambda v: (allow_empty or len(v) > 0) and all(
        _as_int(x) is not None and _as_int(x) >= lo for x in v), must)


def positive_number(name: str, what: str = "", allow_zero: bool = False) -> Rule:
    must = ("be a finite number >= 0" if allow_zero else "be a positive finite number") + (f" ({what})" if what else "")
    return Rule(name, lambda v: isinstance(v, numbers.Real) and math.isfinite(v) and (v >= 0 if allow_zero else v > 0),
                must)


def one_of(name: str, choices: Sequence[str], many: bool = False) -> Rule:
    """A flag (``many``: a list flag, non-empty) whose values are among ``choices``."""
    must = f"be {'a comma-separated list of ' if many else 'one of '}{', '.join(choices)}"
    if many:
        return Rule(name, lambda v: len(v) > 0 and all(x in choices for x in v), must)
    return Rule(name, lambda v: v in choices, must)


def check_flags(program: str, rules: Sequence[Rule], flag_values=None) -> None:
    """Fails (exit 3) at the first flag whose value breaks its rule; an unset flag (None) passes."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    for rule in rules:
        value = flag_values[rule.name].value
        if value is not None and not rule.ok(value):
            shown = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            fail(program, f"--{rule.name}={shown} must {rule.must}.")


def check_output_dir(program: str, flag: str, path: str, files: Sequence[str] = (),
                     merged_json: Sequence[str] = ()) -> None:
    """Fails (exit 3) unless results can be written under ``path``, before any work is done.

    ``path`` must be a directory or creatable as one (nothing is created here), writable;
    ``files`` (written there) must not be directories, and ``merged_json`` files, which the
    program updates, must hold a JSON object when they exist.
    """
    path = storage.absolute(path)
    try:
        storage.check_supported(path)
    except storage.StorageUnsupportedError as err:
        fail(program, f"--{flag}={err}")
    if storage.exists(path) and not storage.isdir(path):
        fail(program, f"--{flag}={path} is a file, not a directory; pass a directory for the results.")
    try:
        _probe_writable(path)
    except NotADirectoryError as err:
        fail(program, f"--{flag}={path} cannot be created because {err.filename} is a file; pass another directory.")
    except OSError as err:
        fail(program, f"--{flag}={path} is not writable ({err.strerror or err}); pass a directory you can write to.")
    for name in tuple(files) + tuple(merged_json):
        target = storage.join(path, name)
        if storage.isdir(target):
            fail(program, f"{target} is a directory, so the result cannot be written there; remove it or pass "
                 f"another --{flag}.")
    for name in merged_json:
        target = storage.join(path, name)
        if storage.isfile(target):
            try:
                ok = isinstance(json.loads(storage.read_text(target)), dict)
            except (OSError, ValueError):
                ok = False
            if not ok:
                fail(program, f"{target} is not a JSON object, so the new result cannot be merged into it; move it "
                     f"away or pass another --{flag}.")


def _probe_writable(path: str) -> None:
    """Writes and removes a probe file in ``path``'s nearest existing ancestor (an object in
    ``path`` itself on an object store, where no directory needs to exist); nothing is created.
    Raises NotADirectoryError (``filename``: the ancestor) when that ancestor is a file."""
    if storage.is_remote(path):
        probe = storage.join(path, f".write_test.{os.getpid()}")
        storage.write_bytes(probe, b"ok")
        storage.remove(probe)
        return
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(20, "Not a directory", existing)
    fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=existing)
    os.close(fd)
    os.remove(probe)


def check_output_file(program: str, flag: str, path: str) -> None:
    """Fails (exit 3) unless ``path`` can be written as a file (its directory checked like an output dir)."""
    path = storage.absolute(path)
    if storage.isdir(path):
        fail(program, f"--{flag}={path} is a directory; pass a file name.")
    check_output_dir(program, flag, storage.dirname(path))


def write_or_fail(program: str, write: Callable[[], Any], what: str, under: Optional[str] = None) -> Any:
    """``write()``; an OSError (disk full, directory gone) ends the program with one line and exit 6.

    With ``under``, only an OSError about a file under that directory (a write) counts; others propagate.
    """
    try:
        return write()
    except OSError as err:
        name = getattr(err, "filename", None)
        if under is not None and not (name and storage.is_within(str(name), under)):
            raise
        where = f" {name}" if name else ""
        fail(program, f"could not write {what}{where} ({err.strerror or err}); the work is done but its result "
             "is lost: free space or fix the directory and re-run.", EXIT_RESULT_WRITE)


# --------------------------------------------------------------------------- evaluation programs


@dataclasses.dataclass(frozen=True)
class EncoderFlags:
    """The flags that pick the frozen encoder an evaluation program measures."""
    config: Any
    workdir: Any
    encoder: Any
    step: Any
    out: Any
    progress: Any

    RULES = (int_at_least("step", 0, "a checkpoint step of --workdir"),)

    def check(self, program: str, result_file: str) -> None:
        """The flags' ranges and the output directory, before anything is restored or computed."""
        check_flags(program, self.RULES)
        out = self.out.value or self.workdir.value or self.encoder.value
        if self.out.value is None and self.encoder.value and not storage.isdir(self.encoder.value):
            out = storage.dirname(storage.absolute(self.encoder.value))  # a .safetensors file: its directory
        if out and bool(self.workdir.value) != bool(self.encoder.value):
            check_output_dir(program, "out" if self.out.value else ("workdir" if self.workdir.value else "encoder"),
                             out, merged_json=(result_file,))

    def restore(self):
        """The :class:`clrjax.evaluation.restore.FrozenEncoder` they name (EvalInputError if bad)."""
        from clrjax.evaluation import restore

        return restore.from_flags(self.workdir.value, self.encoder.value, self.config.value, self.step.value)

    def output_dir(self, encoder) -> str:
        from clrjax.evaluation import restore

        return restore.output_dir(encoder, self.out.value)

    def write(self, program: str, encoder, filename: str, sections: dict) -> str:
        """Merges ``sections`` into ``filename`` of the output directory, each stamped with the command
        line that produced it; a failed write ends ``program`` (:func:`write_or_fail`). Returns the path."""
        from clrjax.evaluation import run_eval

        command = " ".join(sys.argv)
        stamped = {name: dict(section, command=command) for name, section in sections.items()}
        return write_or_fail(program, lambda: run_eval.write_result(self.output_dir(encoder), filename, stamped),
                             filename)


def define_encoder_flags(result_file: str) -> EncoderFlags:
    """Defines --config, --workdir, --encoder, --step, --out and --progress."""
    from ml_collections import config_flags

    return EncoderFlags(
        config=config_flags.DEFINE_config_file(
            "config", None, "Config file (configs/<method>.py:<preset>); default: the run's config.json.",
            lock_config=True),
        workdir=flags.DEFINE_string("workdir", None, "Pretraining run directory (uses its latest checkpoint)."),
        encoder=flags.DEFINE_string("encoder", None, "Export directory written by experiments/export.py "
                                    "(needs --config)."),
        step=flags.DEFINE_integer("step", None, "Checkpoint step of --workdir (default: the latest)."),
        out=flags.DEFINE_string("out", None, f"Directory for {result_file} (default: the run or export "
                                "directory)."),
        progress=flags.DEFINE_bool("progress", True, "Progress line on stderr."),
    )
