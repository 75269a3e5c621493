r"""Pretrains an encoder; re-running the same command resumes the run.

COMMAND:
  python experiments/train.py --config=configs/simclr.py:digits --workdir=runs/simclr_digits \
      [--config.optimizer.lr=3e-3] [--allow_config_change]
Multi-process (see launch/): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.

Exit status: 0 finished; 1 error; 3 config or data error; 4 non-finite values; 5 checkpoint write failed;
75 (EX_TEMPFAIL) stopped by SIGTERM/preemption after saving: re-run to resume.
"""
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clrjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<method>.py:<preset>).",
                                         lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.json.")
_ALLOW_CHANGE = flags.DEFINE_bool("allow_config_change", False,
                                  "Resume a workdir whose saved config differs from --config.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process runs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")
_LOCAL_DEVICE_IDS = flags.DEFINE_list("local_device_ids", None, "Local device ids this process uses.")
_STOP_AFTER = flags.DEFINE_integer("stop_after_steps", None, "End this invocation after N steps (saves first).")

class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop finishes its step, saves and returns."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        return self.requested

    def install(self):
        def handler(signum, _frame):
            logging.warning("Received signal %d: finishing the current step and saving.", signum)
            self.requested = True
        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)


def main(argv):
    del argv
    if _WORKDIR.value is None or _CONFIG.value is None:
        raise app.UsageError("--config and --workdir are required, e.g. "
                             "--config=configs/simclr.py:digits --workdir=runs/simclr_digits")
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint phase at INFO; the console keeps the progress line.
        logging.set_verbosity(logging.WARNING)
    from clrjax import parallel
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
    import jax
    from clrjax import checkpoint as ckpt_lib, config as config_lib, train
    from clrjax.data import folders, sources
    from clrjax.evaluation.run_eval import report_and_evaluate

    stop = _StopFlag()
    stop.install()
    pid = jax.process_index()
    # Expected failures: one line naming the process, and a distinct exit status (clrjax/cli.py).
    expected = ((config_lib.ConfigError, "config error", cli.EXIT_BAD_INPUT),
                (sources.DataError, "data error", cli.EXIT_BAD_INPUT),
                (train.NonFiniteError, "stopped", cli.EXIT_NONFINITE),
                (ckpt_lib.CheckpointWriteError, "stopped", cli.EXIT_CHECKPOINT_WRITE))
    try:
        result = train.train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value,
                             stop_after_steps=_STOP_AFTER.value, should_stop=stop)
    except tuple(kind for kind, _, _ in expected) as err:
        label, status = next((label, status) for kind, label, status in expected if isinstance(err, kind))
        cli.fail(f"[process {pid}] {label}", err, status)
    except Exception as err:  # every process reports a fatal error with its id
        print(f"[process {pid}] fatal error: {type(err).__name__}: {err}", file=sys.stderr)
        raise
    skipped = getattr(result.exp.train_source, "num_skipped", 0)
    if skipped and jax.process_index() == 0:
        report = folders.write_error_report(result.exp.train_source, _WORKDIR.value)
        print(f"Skipped {skipped} bad inputs of the training split (dataset.on_error=skip); see {report}.")
    if result.stopped_early:
        print(f"Stopped at step {int(result.state.step)} after a stop request; checkpoint saved in "
              f"{os.path.abspath(_WORKDIR.value)}. Re-run the same command to resume.")
        sys.exit(cli.EXIT_PREEMPTED)
    report_and_evaluate(result, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
