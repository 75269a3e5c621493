"""Sharded train state (``config.sharding.mode='fsdp'``, clrjax/state_sharding.py) on 8 simulated devices.

FSDP changes where the state lives, not the mathematics of a step: the
replicated run is the reference. Over 3 steps the losses and every parameter
and method-state leaf agree to float32 round-off (max |fsdp - replicated| <=
1e-5 * max |replicated| per leaf; SGD keeps round-off proportional), for a
tiny CNN with SimCLR and a micro ViT with BYOL (EMA target in the method
state). The per-device bytes of parameters + optimizer state fall by the
device count (compile-only, XLA's argument bytes), and checkpoints move
between sharded and replicated runs and across device counts, bit for bit.
"""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import benchmarking, checkpoint as ckpt_lib, config as config_lib, parallel, state_sharding, train
from clrjax.data import pipeline
from clrjax.models import encoders, vit
from tests.test_train import tiny_config

RTOL = 1e-5
STEPS = 3
MIN_SIZE = 256  # small enough that the tiny networks' kernels are sharded

MICRO_VIT = encoders.Encoder(
    name="vit_fsdp_micro", build=lambda cfg, dtype: vit.ViT(dim=cfg["dim"], depth=cfg["depth"], num_heads=2,
                                                            patch_size=4, dtype=dtype),
    defaults={"dim": 16, "depth": 1}, num_features=lambda cfg: cfg["dim"],
    check_input=lambda cfg, image_size: None, doc="a small ViT with 4x4 patches, for tests")


@pytest.fixture(scope="module", autouse=True)
def micro_vit():
    encoders.ENCODERS.register(MICRO_VIT)
    yield
    encoders.ENCODERS.unregister(MICRO_VIT.name)


def fsdp(config, min_size=MIN_SIZE):
    return config_lib.apply_overrides(config, {"sharding.mode": "fsdp", "sharding.min_size": min_size})


def vit_config(method, **overrides):
    config = tiny_config(method, **{"projector.use_bn": False, "predictor.use_bn": False, **overrides})
    config.model = config_lib.ml_collections.ConfigDict({"name": MICRO_VIT.name, "dtype": "float32"})
    return config


CASES = {"simclr_cnn": lambda: tiny_config("simclr"), "byol_vit": lambda: vit_config("byol")}


def run(config, steps=STEPS, num_devices=8):
    """``steps`` compiled steps: host state, losses, the final device state and the compiled step."""
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    state = train.init_train_state(exp)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    batches = [parallel.host_to_global(train.model_batch(next(loader)), mesh) for _ in range(steps)]
    loader.close()
    compiled = train.make_train_step(exp).lower(state, batches[0]).compile()
    losses = []
    for batch in batches:
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))
    return {"host": jax.device_get(state), "losses": losses, "state": state, "compiled": compiled}


# The ViT + BYOL pair (an EMA target sharded like the parameters) costs minutes of compilation on
# 2 cores: slow-only; the CNN + SimCLR pair checks the same rule, equality and layout by default.
@pytest.fixture(scope="module", params=[c if c != "byol_vit" else pytest.param(c, marks=pytest.mark.slow)
                                        for c in sorted(CASES)])
def pair(request):
    config = CASES[request.param]()
    return request.param, run(config), run(fsdp(config))


def assert_trees_close(actual, expected, what):
    for (path, want), got in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(actual)):
        want, got = np.asarray(want), np.asarray(got)
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        err = float(np.max(np.abs(got - want))) if want.size else 0.0
        assert err <= RTOL * scale + 1e-8, f"{what}{jax.tree_util.keystr(path)}: max error {err:.3g}, scale {scale:.3g}"


# --------------------------------------------------------------------------- the rule


RULE_CASES = [
    ((3, 3, 16, 64), (None, None, None, "data")),   # the largest divisible dimension
    ((64, 48), ("data",)),                           # 64 > 48, both divisible
    ((48, 48), ("data",)),                           # a tie: the first
    ((100, 24), (None, "data")),                     # 100 is not divisible by 8, 24 is
    ((1, 1, 1000), (None, None, "data")),
    ((7, 9, 11), ()),                                # nothing divisible: replicated
    ((16,), ()),                                     # fewer than min_size elements: replicated
    ((), ()),                                        # a scalar
]


@pytest.mark.parametrize("shape,spec", RULE_CASES, ids=[str(c[0]) for c in RULE_CASES])
def test_fsdp_rule_shards_the_largest_divisible_dimension(shape, spec):
    assert tuple(state_sharding.fsdp_spec(shape, 8, min_size=100)) == spec


def test_one_device_and_replicated_mode_shard_nothing():
    mesh = parallel.make_mesh(jax.devices()[:1])
    tree = {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32)}
    assert state_sharding.shardings_of(tree, mesh, "fsdp", 1)["w"].is_fully_replicated
    mesh8 = parallel.make_mesh()
    assert state_sharding.shardings_of(tree, mesh8, "replicated", 1)["w"].is_fully_replicated
    assert state_sharding.shardings_of(tree, mesh8, "fsdp", 1)["w"].spec == jax.sharding.PartitionSpec("data")


# --------------------------------------------------------------------------- same run


def test_fsdp_state_is_sharded_by_the_rule(pair):
    name, _, sharded = pair
    state = sharded["state"]
    leaves = jax.tree_util.tree_flatten_with_path(
        {"params": state.params, "opt_state": state.opt_state, "method_state": state.method_state})[0]
    big = [(jax.tree_util.keystr(p), x) for p, x in leaves if x.size >= MIN_SIZE]
    assert big, name
    for path, x in big:
        spec = state_sharding.fsdp_spec(x.shape, 8, MIN_SIZE)
        assert x.sharding.spec == spec, f"{path}: {x.sharding.spec} != {spec}"
        if spec != jax.sharding.PartitionSpec():
            assert x.addressable_shards[0].data.size == x.size // 8, path
    if name == "byol_vit":  # the EMA target network follows the same rule
        assert any("target" in path and not x.sharding.is_fully_replicated for path, x in big)


def test_fsdp_losses_and_parameters_match_replicated(pair):
    name, replicated, sharded = pair
    np.testing.assert_allclose(sharded["losses"], replicated["losses"], rtol=RTOL)
    assert_trees_close(sharded["host"].params, replicated["host"].params, f"{name} params")
    assert_trees_close(sharded["host"].opt_state, replicated["host"].opt_state, f"{name} opt_state")
    assert_trees_close(sharded["host"].method_state, replicated["host"].method_state, f"{name} method_state")


def test_replicated_mode_keeps_every_leaf_whole(pair):
    _, replicated, _ = pair
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(replicated["state"]))


def test_compiled_arguments_hold_the_shards_only(pair):
    """XLA's per-device argument bytes are the state's shards plus the batch's rows."""
    _, replicated, sharded = pair
    for r in (replicated, sharded):
        args = r["compiled"].memory_analysis().argument_size_in_bytes
        state_bytes = state_sharding.per_device_bytes(r["state"])
        assert state_bytes < args < state_bytes + 64 * 1024, (args, state_bytes)
    assert state_sharding.per_device_bytes(sharded["state"]) < state_sharding.per_device_bytes(replicated["state"])


# --------------------------------------------------------------------------- memory, compile-only


def test_per_device_parameter_and_optimizer_bytes_fall_by_the_device_count():
    """A 2-block, 256-wide ViT with AdamW (2 moments per parameter), compiled, never run.

    Its arrays of fewer than 4,096 elements (biases, norms, position embeddings) stay
    replicated, so one device holds a little more than 1/8 (at most 10% more is asserted)."""
    config = vit_config("simclr", **{"optimizer.name": "adamw", "batch_size": 8})
    config.model.dim, config.model.depth = 256, 2
    config = benchmarking.synthetic_config(config, num_examples=16)
    rows = {mode: benchmarking.compile_step_memory(
        config_lib.apply_overrides(config, {"sharding.mode": mode, "sharding.min_size": 4096}))
        for mode in ("replicated", "fsdp")}
    full, shard = ({k: rows[mode][k] for k in ("params_bytes", "opt_state_bytes")} for mode in ("replicated", "fsdp"))
    for part in full:
        assert full[part] / 8 <= shard[part] <= 1.1 * full[part] / 8, (part, full[part], shard[part])
    full, shard = rows["replicated"]["state_bytes"], rows["fsdp"]["state_bytes"]
    # XLA agrees: the argument bytes (state + the batch's rows) fall by the same amount.
    saved = rows["replicated"]["argument_bytes"] - rows["fsdp"]["argument_bytes"]
    assert saved == full - shard, rows


# --------------------------------------------------------------------------- checkpoints


def restore_onto(workdir, step, config, num_devices):
    """The checkpoint of ``step`` restored onto the state layout of ``config`` on ``num_devices``."""
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          jax.eval_shape(lambda: train.init_train_state(exp)), train.train_state_shardings(exp))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=2, keep=3,
                                         async_save=False)
    try:
        state, _ = checkpointer.restore(step, target)
        saved = checkpointer.restore_subtree(step)
    finally:
        checkpointer.close()
    return state, target, saved


def assert_bit_exact(state, saved, what):
    got = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    for path, x in got:
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        node = saved
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else node[int(part)]
        assert np.array_equal(np.asarray(x), np.asarray(node)), f"{what}: {key} differs"


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """A 4-step FSDP run on 8 devices with checkpoints at steps 2 and 4."""
    workdir = str(tmp_path_factory.mktemp("fsdp8"))
    config = fsdp(tiny_config("simclr", num_steps=4))
    result = train.train(config, workdir)
    return config, workdir, jax.device_get(result.state)


@pytest.mark.parametrize("mode,num_devices", [("replicated", 8), ("fsdp", 4), ("fsdp", 2)])
def test_fsdp_checkpoint_restores_bit_exact_onto_another_layout(fsdp_run, mode, num_devices):
    config, workdir, _ = fsdp_run
    target_config = config_lib.apply_overrides(config, {"sharding.mode": mode})
    state, target, saved = restore_onto(workdir, 2, target_config, num_devices)
    for x, want in zip(jax.tree.leaves(state), jax.tree.leaves(target)):
        assert x.sharding == want.sharding
    assert_bit_exact(state, saved, f"{mode} on {num_devices}")


# fsdp on 4 devices is slow only: the restore test above moves the same checkpoint onto it bit for bit.
@pytest.mark.parametrize("mode,num_devices", [("replicated", 8), pytest.param("fsdp", 4, marks=pytest.mark.slow)])
def test_fsdp_run_resumes_on_another_layout(fsdp_run, tmp_path, mode, num_devices):
    """Resumed from step 2 with another layout (no --allow_config_change needed), the run ends
    where the uninterrupted one did, to round-off; its own checkpoint moves back the other way."""
    config, workdir, uninterrupted = fsdp_run
    resumed_dir = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed_dir)
    shutil.rmtree(os.path.join(resumed_dir, "checkpoints", "4"))
    resumed_config = config_lib.apply_overrides(config, {"sharding.mode": mode})
    result = train.train(resumed_config, resumed_dir, mesh=parallel.make_mesh(jax.devices()[:num_devices]))
    assert int(result.state.step) == 4
    assert_trees_close(jax.device_get(result.state.params), uninterrupted.params, f"resumed {mode}")
    back = "fsdp" if mode == "replicated" else "replicated"
    state, _, saved = restore_onto(resumed_dir, 4, config_lib.apply_overrides(config, {"sharding.mode": back}), 2)
    assert_bit_exact(state, saved, f"step 4 of the {mode} run restored {back} on 2 devices")


def test_evaluation_variables_are_gathered(fsdp_run):
    config, workdir, _ = fsdp_run
    exp = train.build_experiment(config, parallel.make_mesh())
    state = train.init_train_state(exp)
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state.params))
    variables = train.encoder_variables_of(state)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(variables))
    assert_bit_exact(variables["params"], jax.device_get(state.params), "gathered params")
