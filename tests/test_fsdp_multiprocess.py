"""FSDP across processes: 2 jax.distributed processes x 4 CPU devices, state sharded over all 8.

A leaf sharded over 8 devices of 2 processes is addressable by neither in full,
so checkpoint checksums gather it (clrjax/state_sharding.py ``host_copy``, a
collective) on save and on restore. The sharded 2-process run must end with the
parameters of the replicated 1-process run (to float32 round-off: rtol 1e-5),
and checkpoints must move between the two layouts and process counts.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.test_multiprocess import (LAST_STEP, LOCAL, ROOT, TINY, TRAIN, assert_same_state, finish, logged,
                                     restore_on_host, resume_copy)
from tests.xla_env import xla_flags

FSDP = ["--config.sharding.mode=fsdp", "--config.sharding.min_size=256"]


def one_process(workdir, *flags):
    env = dict(os.environ, XLA_FLAGS=xla_flags(8), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, TRAIN, f"--workdir={workdir}", *TINY, *flags], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def two_processes(workdir, *flags):
    return subprocess.Popen([sys.executable, LOCAL, "--num_processes=2", "--devices_per_process=4",
                             TRAIN, f"--workdir={workdir}", *TINY, *flags], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# slow: 2 processes x 4 devices; the default suite checks fsdp on 8 devices of one process
# (tests/test_fsdp.py) and multi-process training replicated (tests/test_multiprocess.py).
@pytest.mark.slow
def test_two_process_fsdp_matches_one_process_replicated_and_checkpoints_cross(tmp_path):
    dirs = {name: tmp_path / name for name in ("replicated", "fsdp", "fsdp_to_replicated", "replicated_to_fsdp")}
    replicated, sharded = one_process(dirs["replicated"]), two_processes(dirs["fsdp"], *FSDP)
    finish(sharded, "2 processes x 4 devices, fsdp")
    finish(replicated, "1 process x 8 devices, replicated")
    one, two = restore_on_host(dirs["replicated"]), restore_on_host(dirs["fsdp"])
    assert int(two["step"]) == LAST_STEP
    assert_same_state(one["params"], two["params"])
    assert_same_state(one["opt_state"], two["opt_state"])
    for step, row in logged(dirs["replicated"]).items():
        np.testing.assert_allclose(logged(dirs["fsdp"])[step]["loss"], row["loss"], rtol=1e-5)

    # Step 3 of each run resumes in the other layout and process count, without --allow_config_change.
    resume_copy(dirs["fsdp"], dirs["fsdp_to_replicated"])
    resume_copy(dirs["replicated"], dirs["replicated_to_fsdp"])
    to_replicated = one_process(dirs["fsdp_to_replicated"])
    to_fsdp = two_processes(dirs["replicated_to_fsdp"], *FSDP)
    outputs = [finish(to_fsdp, "2-process fsdp resume of the replicated checkpoint"),
               finish(to_replicated, "1-process replicated resume of the 2-process fsdp checkpoint")]
    assert all("Resumed from step 3" in out for out in outputs)
    for name in ("fsdp_to_replicated", "replicated_to_fsdp"):
        resumed = restore_on_host(dirs[name])
        assert int(resumed["step"]) == LAST_STEP
        assert_same_state(one["params"], resumed["params"])
