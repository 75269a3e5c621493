"""Tests for clrjax.metrics: files written, read back with independent readers."""
import json
import math
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _read_tensorboard_scalars(logdir):
    """{tag: [(step, value)]} read with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing import event_accumulator
    from tensorboard.util import tensor_util

    acc = event_accumulator.EventAccumulator(logdir)
    acc.Reload()
    # tensorboard.summary.Writer stores scalars as rank-0 tensors (data_class SCALAR).
    return {tag: [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


def test_jsonl_round_trip_and_tensorboard_scalars(tmp_path):
    rng = np.random.default_rng(0)
    written = []
    with metrics.MetricWriter(str(tmp_path)) as writer:
        for step in (0, 10, 20):
            row = {"loss": float(rng.normal()), "probe_acc": np.float32(rng.uniform()),
                   "lr": jnp.asarray(0.1 * step)}
            writer.write_scalars(step, row)
            written.append({"step": step, **{k: float(v) for k, v in row.items()}})
        # Flushed on every call: readable before close.
        assert metrics.read_metrics(str(tmp_path / "metrics.jsonl")) == written

    rows = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert rows == written
    assert all(type(v) in (int, float) for row in rows for v in row.values())

    tb = _read_tensorboard_scalars(str(tmp_path / "tensorboard"))
    assert set(tb) == {"loss", "probe_acc", "lr"}
    for key in tb:
        assert [s for s, _ in tb[key]] == [0, 10, 20]
        np.testing.assert_allclose([v for _, v in tb[key]], [r[key] for r in written], rtol=1e-6)


def test_write_scalars_rejects_non_scalars_and_reserved_step(tmp_path):
    with metrics.MetricWriter(str(tmp_path)) as writer:
        with pytest.raises(ValueError, match="loss"):
            writer.write_scalars(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError, match="step"):
            writer.write_scalars(1, {"step": 3})


def test_read_metrics_tolerates_truncated_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "loss": 1.5}\n{"step": 2, "lo')
    assert metrics.read_metrics(str(path)) == [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.5}]


def test_read_metrics_rejects_corruption_in_the_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=":2 "):
        metrics.read_metrics(str(path))


def test_resumed_writer_drops_torn_line_before_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "loss": 2.0}\n{"step": 1, "lo')  # killed mid-write
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(1, {"loss": 1.5})
    assert metrics.read_metrics(str(path)) == [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.5}]


def test_non_finite_values_round_trip(tmp_path):
    with metrics.MetricWriter(str(tmp_path)) as writer:
        writer.write_scalars(3, {"loss": float("nan"), "grad_norm": float("inf")})
    (row,) = metrics.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert row["step"] == 3 and math.isnan(row["loss"]) and row["grad_norm"] == math.inf


def test_write_json_and_config_are_atomic_and_plain(tmp_path):
    ml_collections = pytest.importorskip("ml_collections")
    config = ml_collections.ConfigDict({"model": {"widths": (32, 64)}, "lr": 0.3, "name": "simclr"})
    path = metrics.write_config_json(str(tmp_path), config)
    assert path == str(tmp_path / "config.json")
    with open(path) as f:
        assert json.load(f) == {"model": {"widths": [32, 64]}, "lr": 0.3, "name": "simclr"}

    with metrics.MetricWriter(str(tmp_path)) as writer:
        out = writer.write_json("eval", {"acc": np.float32(0.5), "counts": np.arange(3), "ok": True})
    with open(out) as f:
        assert json.load(f) == {"acc": 0.5, "counts": [0, 1, 2], "ok": True}
    assert out.endswith("eval.json")
    # No temporary files left behind.
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]


def test_failed_json_write_keeps_previous_file(tmp_path):
    with metrics.MetricWriter(str(tmp_path)) as writer:
        path = writer.write_json("state.json", {"a": 1})
        with pytest.raises(TypeError):
            writer.write_json("state.json", {"a": object()})
    with open(path) as f:
        assert json.load(f) == {"a": 1}
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "state.json", "tensorboard"]


def test_disabled_writer_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with metrics.MetricWriter(str(workdir), enabled=False) as writer:
        writer.write_scalars(0, {"loss": 1.0})
        assert writer.write_json("x", {"a": 1}) is None
    assert not workdir.exists()
    progress = metrics.ProgressLine(100, enabled=False, emit=pytest.fail)
    assert progress.update(1, {"loss": 1.0}, images_per_step=8) is None


class _FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_line_format_rate_and_eta():
    clock, lines = _FakeClock(), []
    progress = metrics.ProgressLine(1000, emit=lines.append, clock=clock)
    first = progress.update(100, {"loss": 4.1234, "probe_acc": 0.5121}, images_per_step=256)
    assert first == "step 100/1000 | loss 4.123 | probe_acc 0.5121 | - img/s | ETA ?"
    # 20 steps in 2 s (0.1 s/step), then 20 steps in 4 s (0.2 s/step): average 0.15 s/step.
    clock.now += 2.0
    progress.update(120, {"loss": 4.0}, images_per_step=256)
    clock.now += 4.0
    line = progress.update(140, {"loss": 3.9, "probe_acc": jnp.asarray(0.6)}, images_per_step=256)
    assert lines == [first, lines[1], line]
    pattern = r"step 140/1000 \| loss 3\.9 \| probe_acc 0\.6 \| ([\d,]+) img/s \| ETA (\d+)m(\d\d)s"
    match = re.fullmatch(pattern, line)
    assert match, line
    images_per_second = 256 / 0.15
    assert int(match.group(1).replace(",", "")) == round(images_per_second)
    assert "," in match.group(1)  # 1,707 img/s
    eta_seconds = 60 * int(match.group(2)) + int(match.group(3))
    assert eta_seconds == round((1000 - 140) * 0.15)  # 129 s -> 2m09s


def test_progress_line_eta_in_hours():
    clock = _FakeClock()
    progress = metrics.ProgressLine(100_000, emit=lambda _: None, clock=clock)
    progress.update(0, {}, images_per_step=4096)
    clock.now += 10.0
    line = progress.update(10, {}, images_per_step=4096)
    assert line.endswith("| 4,096 img/s | ETA 27h46m")  # 99,990 s


def test_plot_curves_writes_png_for_present_keys(tmp_path):
    jsonl = tmp_path / "metrics.jsonl"
    with metrics.MetricWriter(str(tmp_path)) as writer:
        for step in range(5):
            writer.write_scalars(step, {"loss": 5.0 - step, "lr": 0.1})
    out = tmp_path / "plots" / "curves.png"
    plotted = metrics.plot_curves(str(jsonl), str(out))
    assert plotted == ["loss"]  # probe_acc absent
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    with pytest.raises(ValueError, match="available"):
        metrics.plot_curves(str(jsonl), str(tmp_path / "none.png"), keys=("knn_acc",))


def test_truncate_after_drops_the_replayed_steps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with metrics.MetricWriter(str(tmp_path)) as writer:
        for step in range(1, 7):
            writer.write_scalars(step, {"loss": 1.0 / step})
        writer.write_scalars(4, {"knn20_top1": 0.5})  # an evaluation row shares its step
    with open(path, "a") as f:
        f.write('{"step": 7, "lo')  # torn by a kill
    lines = path.read_text().split("\n")
    assert metrics.truncate_after(str(tmp_path), 4) == 2  # steps 5 and 6
    assert [r["step"] for r in metrics.read_metrics(str(path))] == [1, 2, 3, 4, 4]
    assert path.read_text() == "\n".join(lines[:4] + lines[6:7]) + "\n"  # the kept lines, byte for byte
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp_")]
    before = path.stat().st_mtime_ns
    assert metrics.truncate_after(str(tmp_path), 4) == 0 and path.stat().st_mtime_ns == before  # no rewrite
    assert metrics.truncate_after(str(tmp_path), None) == 5 and path.read_text() == ""  # a fresh start
    assert metrics.truncate_after(str(tmp_path / "missing"), 3) == 0


def test_progress_line_counts_examples_and_is_due_by_interval():
    clock, lines = _FakeClock(), []
    progress = metrics.ProgressLine(450, emit=lines.append, clock=clock, label="probe: step", min_interval_s=0.25)
    assert progress.due()
    assert progress.update(1, {}, images_per_step=256, examples=256) == "probe: step 1/450, 256 examples | - img/s | ETA ?"
    assert not progress.due()
    clock.now += 2.0
    assert progress.due()
    line = progress.update(9, {}, images_per_step=256, examples=9 * 256)
    assert line == "probe: step 9/450, 2,304 examples | 1,024 img/s | ETA 1m50s"  # 8 steps in 2 s
    assert not metrics.ProgressLine(10, enabled=False).due()
