"""Run outputs: TensorBoard + JSON-lines scalars, atomic JSON files, console progress, plots.

A run's workdir holds:
  workdir/tensorboard/events.out.tfevents.*   scalars for TensorBoard
  workdir/metrics.jsonl                       one {"step": s, name: value, ...} per write; a resumed
                                              run first drops the rows after its checkpoint (`truncate_after`)
  workdir/config.json                         the resolved config (`write_config_json`)
  workdir/<name>.json                         anything else (`MetricWriter.write_json`)

A `gs://` workdir (clrjax/storage.py) gets the same files. Objects cannot be
appended to, so there the writer keeps `metrics.jsonl` and the event file in a
local staging directory and uploads each whole after every write (the cost
grows with the file: about 100 bytes per row).

Events are written with `tensorboard.summary.Writer`, not clu's writers,
because clu's `metric_writers` and `periodic_actions` import TensorFlow,
which training does not otherwise need. In multi-host runs only
process 0 should write: construct writers with `enabled=jax.process_index() == 0`.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from clrjax import storage

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"
CONFIG_FILENAME = "config.json"


# ---------------------------------------------------------------------------
# JSON helpers
# ---------------------------------------------------------------------------
def _to_jsonable(obj: Any) -> Any:
    """Plain-Python copy of `obj`: tuples -> lists, numpy/JAX arrays -> lists/scalars."""
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool, int, float)) or obj is None:
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if hasattr(obj, "__array__"):  # numpy and JAX arrays
        return np.asarray(obj).tolist()
    return obj  # json.dumps raises a TypeError naming the type if it cannot encode it


def write_json_file(path: str, obj: Any) -> None:
    """Writes `obj` as JSON to `path` so readers see the old file or the new, never half."""
    storage.makedirs(storage.dirname(storage.absolute(path)))
    write_text_atomically(path, json.dumps(_to_jsonable(obj), indent=2, sort_keys=True) + "\n")


def write_text_atomically(path: str, text: str) -> None:
    """Replaces `path` by `text` through a temporary file (old or new content, never half).

    An object store's upload is atomic by itself: there the object is written directly.
    """
    if storage.is_remote(path):
        storage.write_bytes(path, text.encode("utf-8"))
        return
    # The temporary file must be on the same filesystem for os.replace to be atomic.
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


def _scalar_to_float(name: str, value: Any) -> float:
    array = np.asarray(value)  # also pulls JAX arrays to host
    if array.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}.")
    return float(array.reshape(()))


def _drop_torn_last_line(path: str) -> None:
    """Truncates a partial last line left by a run killed mid-write.

    Without this, the next run's first append would glue onto the fragment and
    corrupt a line in the middle of the file.
    """
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


# ---------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------
class MetricWriter:
    """Writes scalars to TensorBoard and `metrics.jsonl`, and JSON files, under `workdir`.

    Every `write_scalars` call flushes both outputs, so a killed run loses at
    most the line being written (which `read_metrics` skips). With
    `enabled=False` (non-zero processes in multi-host runs) nothing is created
    or written and every method is a no-op.

    Use as a context manager, or call `close()`.
    """

    def __init__(self, workdir: str, enabled: bool = True):
        self.workdir = workdir
        self.enabled = enabled
        self._tb_writer = None
        self._jsonl = None
        self._staging = None  # a remote workdir's local copy of the outputs
        if not enabled:
            return
        # Imported here so disabled writers (and importers of read_metrics) do not pay for it.
        from tensorboard.summary import Writer

        storage.makedirs(workdir)
        self._staging = self._stage(workdir) if storage.is_remote(workdir) else None
        local = self._staging or workdir
        self._tb_writer = Writer(os.path.join(local, TENSORBOARD_DIRNAME))
        jsonl_path = os.path.join(local, METRICS_FILENAME)
        _drop_torn_last_line(jsonl_path)
        # Append: a resumed run continues the same file.
        self._jsonl = open(jsonl_path, "a", encoding="utf-8")

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """Writes `scalars` (name -> scalar: float, numpy or JAX) at `step`.

        The JSON line is `{"step": step, name: float(value), ...}`; non-finite
        values are written as NaN/Infinity, which Python's json reads back.
        """
        if not self.enabled:
            return
        if "step" in scalars:
            raise ValueError("'step' is reserved for the step number; rename that metric.")
        step = int(step)
        values = {name: _scalar_to_float(name, value) for name, value in scalars.items()}
        for name, value in values.items():
            self._tb_writer.add_scalar(name, value, step)
        self._tb_writer.flush()
        self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self._jsonl.flush()
        self._upload()

    @staticmethod
    def _stage(workdir: str) -> str:
        """A local directory that mirrors the remote outputs, holding the remote metrics.jsonl so far."""
        staging = tempfile.mkdtemp(prefix="clrjax_metrics_")
        remote = storage.join(workdir, METRICS_FILENAME)
        if storage.exists(remote):
            with open(os.path.join(staging, METRICS_FILENAME), "wb") as f:
                f.write(storage.read_bytes(remote))
        return staging

    def _upload(self) -> None:
        """Uploads every staged file whole (a remote workdir; objects have no append)."""
        if self._staging is None:
            return
        for root, _, names in os.walk(self._staging):
            for name in names:
                local = os.path.join(root, name)
                relative = os.path.relpath(local, self._staging).replace(os.sep, "/")
                storage.upload(local, storage.join(self.workdir, relative))

    def write_json(self, name: str, obj: Any) -> str | None:
        """Atomically writes `obj` to `workdir/name` ('.json' appended if no suffix); returns the path."""
        if not self.enabled:
            return None
        if not os.path.splitext(name)[1]:
            name += ".json"
        path = storage.join(self.workdir, name)
        write_json_file(path, obj)
        return path

    def close(self) -> None:
        """Flushes and closes the outputs; safe to call twice."""
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._staging is not None:
            self._upload()  # the events the writer flushed on close
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path: str) -> list[dict]:
    """Rows of a `metrics.jsonl` file, in file order.

    A truncated last line (a run killed mid-write) is skipped; a malformed line
    anywhere else is corruption and raises ValueError with its line number.
    """
    lines = storage.read_text(path).split("\n")
    # A complete file ends with "\n", so the final element is "" unless torn.
    rows = []
    last = len(lines) - 1
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == last:
                break
            raise ValueError(f"{path}:{number + 1} is not valid JSON ({e}).") from e
    return rows


def truncate_after(workdir: str, step: int | None) -> int:
    """Drops the rows of `workdir/metrics.jsonl` whose step is after `step`; returns how many.

    Call it when a run resumes from the checkpoint of `step` (None or 0: a
    fresh start), before anything is appended. The interrupted invocation
    logged steps past that checkpoint, and the resumed one logs them again:
    without this the file would hold the replayed steps twice (e.g. 70 rows
    for a 40-step run). The rows of the run that continued are the ones kept.
    The file is rewritten atomically (the original lines, byte for byte), and
    only if a row goes; a torn last line goes too. Lines that are not valid
    JSON elsewhere are kept (their step is unknown). Process 0 only.
    """
    path = storage.join(workdir, METRICS_FILENAME)
    if not storage.exists(path):
        return 0
    limit = int(step or 0)
    text = storage.read_text(path)
    lines = text.split("\n")
    torn = lines.pop()  # "" when the file ends with a newline; otherwise a partial last line
    kept, dropped = [], 0
    for line in lines:
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)) and row["step"] > limit:
            dropped += 1
        else:
            kept.append(line)
    if dropped or torn:
        write_text_atomically(path, "".join(line + "\n" for line in kept))
    return dropped


def write_config_json(workdir: str, config: Any) -> str:
    """Atomically writes the resolved `config` to `workdir/config.json`; returns the path.

    `config` is an ml_collections ConfigDict (converted with `to_dict()`, which
    resolves field references) or a mapping; tuples become lists. Call it on
    process 0 only.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    path = storage.join(workdir, CONFIG_FILENAME)
    write_json_file(path, config)
    return path


# ---------------------------------------------------------------------------
# Console progress
# ---------------------------------------------------------------------------
def _format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class ProgressLine:
    """One console line per call: `step 120/1000 | loss 4.123 | 2,345 img/s | ETA 3m12s`.

    Throughput and ETA use the time per step averaged over the last `window`
    intervals between `update` calls (weighted by the steps in each), so the
    first call, which usually includes compilation, only sets the reference
    time and shows no rate. `step` is the number of completed steps.

    Loops that call `update` on every batch (feature extraction, probe
    training) set `min_interval_s`, so printing never costs measurable time
    (the rate still counts every call), and `in_place`, so one stderr line is
    redrawn instead of a line per batch; `close` then prints the final state
    and ends the line: `extract_features: batch 40/40, 5,120 examples | 9,876 img/s | ETA 0s`.

    Args:
      total_steps: steps in the run; None when unknown (no ETA is shown).
      enabled: False on non-zero processes: `update` returns None, prints nothing.
      emit: called with each line (default `print`; pass `absl.logging.info`
        in absl mains to also get it in the log files). Not with `in_place`.
      window: number of recent intervals in the moving average.
      clock: seconds as a float (injectable for tests).
      label: what is counted, e.g. `step` or `extract_features: batch`.
      min_interval_s: `update` emits nothing (returns None) this soon after
        the last line it emitted.
      in_place: redraw a single line on stderr (carriage return).
    """

    def __init__(self, total_steps: int | None, enabled: bool = True,
                 emit: Callable[[str], None] | None = None, window: int = 20,
                 clock: Callable[[], float] = time.monotonic, *, label: str = "step",
                 min_interval_s: float = 0.0, in_place: bool = False):
        if in_place and emit is not None:
            raise ValueError("ProgressLine: in_place=True writes to stderr itself; do not also pass emit.")
        self.total_steps = None if total_steps is None else int(total_steps)
        self.enabled = enabled
        self.label = label
        self.min_interval_s = min_interval_s
        self._in_place = in_place
        self._emit = _redraw_stderr_line if in_place else (emit or _print_line)
        self._clock = clock
        self._intervals = collections.deque(maxlen=window)  # (steps, seconds)
        self._last = None  # (step, time) of the previous call
        self._last_emitted = None  # time of the last line emitted

    def seconds_per_step(self) -> float | None:
        steps = sum(s for s, _ in self._intervals)
        return sum(t for _, t in self._intervals) / steps if steps > 0 else None

    def _record(self, step: int) -> float:
        now = self._clock()
        if self._last is not None and step > self._last[0]:
            self._intervals.append((step - self._last[0], now - self._last[1]))
        self._last = (step, now)
        return now

    def due(self) -> bool:
        """Whether an `update` now would emit a line (enabled and not within `min_interval_s`).

        Loops whose steps are dispatched asynchronously block on their work
        only when this is true, then call `update`: the recorded intervals
        then time finished work, not dispatches, at no cost per step.
        """
        return self.enabled and not self._too_soon(self._clock())

    def _too_soon(self, now: float) -> bool:
        return self._last_emitted is not None and now - self._last_emitted < self.min_interval_s

    def update(self, step: int, metrics: Mapping[str, Any], images_per_step: int, *,
               examples: int | None = None, force: bool = False) -> str | None:
        """Records the time of `step`, emits the line and returns it (None if disabled or too soon).

        `examples`, if given, is the running count shown after the step;
        `force` emits even within `min_interval_s`.
        """
        if not self.enabled:
            return None
        step = int(step)
        now = self._record(step)
        if not force and self._too_soon(now):
            return None
        self._last_emitted = now
        line = self._format(step, metrics, images_per_step, examples)
        self._emit(line)
        return line

    def close(self, step: int, metrics: Mapping[str, Any], images_per_step: int, *,
              examples: int | None = None) -> str | None:
        """Emits the final line regardless of `min_interval_s` and ends an `in_place` line."""
        line = self.update(step, metrics, images_per_step, examples=examples, force=True)
        if line is not None and self._in_place:
            sys.stderr.write("\n")
            sys.stderr.flush()
        return line

    def _format(self, step: int, metrics: Mapping[str, Any], images_per_step: int,
                examples: int | None) -> str:
        position = f"{self.label} {step}"
        if self.total_steps is not None:
            position += f"/{self.total_steps}"
        if examples is not None:
            position += f", {examples:,} examples"
        parts = [position]
        parts += [f"{name} {_scalar_to_float(name, v):.4g}" for name, v in metrics.items()]
        sec_per_step = self.seconds_per_step()
        has_rate = sec_per_step is not None and sec_per_step > 0
        parts.append(f"{images_per_step / sec_per_step:,.0f} img/s" if has_rate else "- img/s")
        if self.total_steps is not None and has_rate:
            parts.append(f"ETA {_format_duration(max(self.total_steps - step, 0) * sec_per_step)}")
        elif self.total_steps is not None:
            parts.append("ETA ?")
        return " | ".join(parts)


def _print_line(line: str) -> None:
    print(line, flush=True)


def _redraw_stderr_line(line: str) -> None:
    sys.stderr.write("\r" + line)
    sys.stderr.flush()


# ---------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------
def plot_curves(metrics_jsonl: str, out_png: str,
                keys: Sequence[str] = ("loss", "probe_acc")) -> list[str]:
    """PNG of each metric in `keys` against step, one subplot per key present.

    Uses matplotlib's Agg canvas directly (no pyplot), so it neither needs a
    display nor changes the caller's backend. Returns the keys plotted.

    Raises:
      ValueError: none of `keys` appears in the file.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_jsonl)
    present = [k for k in keys if any(k in row for row in rows)]
    if not present:
        available = sorted({k for row in rows for k in row} - {"step"})
        raise ValueError(f"none of {list(keys)} is in {metrics_jsonl}; available: {available}.")
    fig = Figure(figsize=(4.5 * len(present), 3.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(present), squeeze=False)[0]
    for ax, key in zip(axes, present):
        points = [(row["step"], row[key]) for row in rows if key in row]
        steps, values = zip(*points)
        ax.plot(steps, values, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    storage.makedirs(storage.dirname(storage.absolute(out_png)))
    storage.save_figure(fig, out_png)
    return present
