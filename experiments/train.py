r"""Pretrains an encoder; re-running the same command resumes the run.

COMMAND:
  python experiments/train.py --config=configs/simclr.py:digits --workdir=runs/simclr_digits \
      [--config.optimizer.lr=3e-3] [--allow_config_change]
Multi-process (see launch/): add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.

Exit status (clrjax/cli.py): 0 finished; 1 unexpected error; 3 bad flags, config or data; 4 non-finite
values; 5 checkpoint write failed; 6 eval.json could not be written; 75 (EX_TEMPFAIL) stopped by
SIGTERM/preemption after saving: re-run to resume.
"""
import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from clrjax import cli, storage

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

# Checked at the start of main, before anything is loaded (clrjax/cli.py).
_RULES = (cli.int_at_least("stop_after_steps", 1, "the steps this invocation trains before it saves and exits"),
          cli.int_at_least("num_processes", 1),
          cli.int_at_least("process_id", 0),
          cli.ints_at_least("local_device_ids", 0, "local device indices"),
          cli.Rule("coordinator_address", lambda v: _is_host_port(v), "be HOST:PORT with a port in 1..65535"))


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _check_flags() -> None:
    if _WORKDIR.value is None or _CONFIG.value is None:
        cli.fail("train", "--config and --workdir are required, e.g. "
                 "--config=configs/simclr.py:digits --workdir=runs/simclr_digits")
    if not _WORKDIR.value.strip():
        cli.fail("train", "--workdir is empty; pass the run directory, e.g. --workdir=runs/simclr_digits")
    cli.check_flags("train", _RULES)
    n, i = _NUM_PROCESSES.value, _PROCESS_ID.value
    if n is not None and i is not None and i >= n:
        cli.fail("train", f"--process_id={i} must be below --num_processes={n} (processes are numbered 0..{n - 1}).")

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
    _check_flags()
    if not flags.FLAGS["verbosity"].present:
        # Orbax logs every checkpoint phase at INFO; the console keeps the progress line.
        logging.set_verbosity(logging.WARNING)
    from clrjax import parallel
    parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                    [int(i) for i in _LOCAL_DEVICE_IDS.value] if _LOCAL_DEVICE_IDS.value else None)
    import jax
    from clrjax import checkpoint as ckpt_lib, config as config_lib, train, workdir_lock
    from clrjax.data import folders, sources
    from clrjax.evaluation import restore
    from clrjax.evaluation.run_eval import report_and_evaluate

    stop = _StopFlag()
    stop.install()
    pid = jax.process_index()
    # Expected failures: one line naming the process, and a distinct exit status (clrjax/cli.py).
    expected = ((config_lib.ConfigError, "config error", cli.EXIT_BAD_INPUT),
                (sources.DataError, "data error", cli.EXIT_BAD_INPUT),
                (restore.EvalInputError, "evaluation error", cli.EXIT_BAD_INPUT),
                (ckpt_lib.CheckpointDamagedError, "checkpoint error", cli.EXIT_BAD_INPUT),
                (workdir_lock.WorkdirBusyError, "workdir error", cli.EXIT_BAD_INPUT),
                (train.NonFiniteError, "stopped", cli.EXIT_NONFINITE),
                (ckpt_lib.CheckpointWriteError, "stopped", cli.EXIT_CHECKPOINT_WRITE))
    try:
        result = train.train(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CHANGE.value,
                             stop_after_steps=_STOP_AFTER.value, should_stop=stop)
        _report(result, folders, report_and_evaluate)
    except tuple(kind for kind, _, _ in expected) as err:
        label, status = next((label, status) for kind, label, status in expected if isinstance(err, kind))
        if isinstance(err, ckpt_lib.CheckpointWriteError):
            _exit_now(f"[process {pid}] {label}", err, status)
        cli.fail(f"[process {pid}] {label}", err, status)
    except OSError as err:
        if not _in_workdir(err):
            print(f"[process {pid}] fatal error: {type(err).__name__}: {err}", file=sys.stderr)
            raise
        cli.fail(f"[process {pid}] stopped", f"could not write {err.filename} ({err.strerror or err}); "
                 "the checkpoints are saved: free space and re-run to write the results", cli.EXIT_RESULT_WRITE)
    except Exception as err:  # every process reports a fatal error with its id
        print(f"[process {pid}] fatal error: {type(err).__name__}: {err}", file=sys.stderr)
        raise


def _exit_now(program: str, message, status: int):
    """``cli.fail`` without the interpreter's shutdown, which joins every thread: after a failed
    save Orbax leaves threads waiting up to 300 s for a signal that never comes (a read-only
    checkpoints directory held a cluster allocation 5 minutes). What matters is already on disk
    (train() closed the metric writers and the checkpoint manager); the streams are flushed here."""
    print(f"{program}: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    logging.flush()
    os._exit(status)


def _in_workdir(err: OSError) -> bool:
    """Whether an OSError is about a file under --workdir (a result that could not be written)."""
    name = getattr(err, "filename", None)
    return bool(name) and storage.is_within(str(name), _WORKDIR.value)


def _report(result, folders, report_and_evaluate) -> None:
    """After train.train: the skipped-input count, the stop notice (exit 75) or the final evaluation."""
    import jax

    skipped = getattr(result.exp.train_source, "num_skipped", 0)
    if skipped and jax.process_index() == 0:
        report = folders.write_error_report(result.exp.train_source, _WORKDIR.value)
        print(f"Skipped {skipped} bad inputs of the training split (dataset.on_error=skip); see {report}.")
    if result.stopped_early:
        print(f"Stopped at step {int(result.state.step)} after a stop request; checkpoint saved in "
              f"{storage.absolute(_WORKDIR.value)}. Re-run the same command to resume.")
        sys.exit(cli.EXIT_PREEMPTED)
    report_and_evaluate(result, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
