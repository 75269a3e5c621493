"""``config.profile_steps``: a JAX profiler trace of the named steps in <workdir>/profile (clrjax/profiling.py)."""
import glob
import os

import pytest

from clrjax import config as config_lib
from clrjax import profiling, train
from tests.test_train import tiny_config


def traces(workdir):
    return glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*", "*.xplane.pb"))


def test_a_three_step_run_writes_one_trace_of_the_named_steps(tmp_path):
    result = train.train(tiny_config("simclr", num_steps=3, profile_steps=(1, 3)), str(tmp_path))
    assert int(result.state.step) == 3
    found = traces(str(tmp_path))
    assert len(found) == 1 and os.path.getsize(found[0]) > 0, found


def test_no_trace_without_profile_steps(tmp_path):
    train.train(tiny_config("simclr", num_steps=1), str(tmp_path))
    assert not os.path.exists(os.path.join(tmp_path, "profile"))


def test_trace_starts_before_step_a_plus_1_and_stops_after_step_b(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(profiling.jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
    monkeypatch.setattr(profiling.jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
    profiler = profiling.StepProfiler((2, 4), str(tmp_path), enabled=True)
    for completed in range(6):  # step completed+1 runs between the two calls
        profiler.before_step(completed)
        calls.append(("step", completed + 1))
        profiler.after_step(completed + 1, None)
    profiler.stop()
    assert calls == [("step", 1), ("step", 2), ("start", os.path.join(str(tmp_path), "profile")),
                     ("step", 3), ("step", 4), ("stop",), ("step", 5), ("step", 6)]
    off = profiling.StepProfiler((2, 4), str(tmp_path), enabled=False)  # processes other than 0
    off.before_step(2)
    off.stop()
    assert calls[-1] == ("step", 6)


@pytest.mark.parametrize("value,message", [
    ((3, 2), "config.profile_steps is (3, 2) but must be () or (a, b) with whole numbers 0 <= a < b"),
    ((1,), "config.profile_steps is (1,) but must be () or (a, b)"),
    ((2, 10), "config.profile_steps is (2, 10) but the run has only 3 steps"),
])
def test_profile_steps_outside_the_run_fail_validation(value, message):
    with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate_config(tiny_config("simclr", num_steps=3, profile_steps=value), num_devices=8)


def test_profile_steps_beyond_an_epoch_based_run_fail_before_training(tmp_path):
    config = tiny_config("simclr", num_steps=0, num_epochs=1.0, profile_steps=(0, 10**6))
    with pytest.raises(config_lib.ConfigError, match=r"config.profile_steps is \(0, 1000000\) but the run has only"):
        train.build_experiment(config)
