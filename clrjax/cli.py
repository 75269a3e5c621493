"""What the absl programs in ``experiments/`` share: exit codes, flag parsing, errors, eval flags.

Every program ends a user error with one line on stderr, naming what was wrong and how to fix
it, and a distinct exit status (no traceback):

* 0 done; 1 unexpected error (traceback);
* 3 bad input: config, data, workdir or checkpoint (:data:`EXIT_BAD_INPUT`);
* 4 non-finite values stopped training; 5 a checkpoint could not be written;
* 75 (``EX_TEMPFAIL`` of sysexits.h) stopped by SIGTERM/preemption after saving: re-run to resume.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, NoReturn

from absl import flags

EXIT_BAD_INPUT = 3
EXIT_NONFINITE = 4
EXIT_CHECKPOINT_WRITE = 5
EXIT_PREEMPTED = 75


def fail(program: str, message: Any, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """Prints ``program: message`` on stderr and exits with ``status``."""
    print(f"{program}: {message}", file=sys.stderr, flush=True)
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


def parse_flags(argv):
    """absl flag parsing (``app.run(main, flags_parser=parse_flags)``) whose config errors end
    in one line and exit 3 instead of a traceback."""
    path = config_file_arg(argv[1:])
    if path is not None and not os.path.isfile(path):
        fail("config error", f"the config file {path!r} does not exist (relative to {os.getcwd()}); "
             "pass e.g. --config=configs/simclr.py:digits.")
    try:
        remaining = flags.FLAGS(argv)
        # ml_collections defers a config file's load errors to the config's first use.
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            flags.FLAGS["config"].value.keys()
        return remaining
    except Exception as err:  # flags.Error; ml_collections' AttributeError, KeyError, TypeError, OSError
        fail("config error", f"{flag_error_text(err)} (check --config=FILE:PRESET and the --config.<field> "
             "names and values; every field is listed in clrjax/config.py base_config)")


@dataclasses.dataclass(frozen=True)
class EncoderFlags:
    """The flags that pick the frozen encoder an evaluation program measures."""
    config: Any
    workdir: Any
    encoder: Any
    step: Any
    out: Any
    progress: Any

    def restore(self):
        """The :class:`clrjax.evaluation.restore.FrozenEncoder` they name (EvalInputError if bad)."""
        from clrjax.evaluation import restore

        return restore.from_flags(self.workdir.value, self.encoder.value, self.config.value, self.step.value)

    def output_dir(self, encoder) -> str:
        from clrjax.evaluation import restore

        return restore.output_dir(encoder, self.out.value)


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
