"""The shared method-test harness: every registered method gets the same exactness checks.

A method registers itself (``clrjax/methods/__init__.py``) and its float64
reference (``tests/methods/references.py``); nothing else is needed for it to
be checked here:

1. its per-shard loss on one device equals the float64 reference of its
   definition, in value and new method state, over two consecutive steps
   (so carried state such as TiCo's covariance is exercised), and in its
   gradient w.r.t. every embedding;
2. under ``jax.shard_map`` on 2 and 8 devices the loss, metrics and new
   state are identical on every shard and equal the one-device values, and
   so are the gradients w.r.t. every embedding row;
3. under ``jax.pmap`` (4 devices) each device's value and the pmean of a
   replicated parameter's gradient equal the one-device ones;
4. one full train step on 8 devices equals 1 device (parameters, BatchNorm
   statistics and method state): one method of each interface shape in the
   default suite, every method with ``-m slow``;
5. a run stopped after 2 steps and resumed ends bit-identical to an
   uninterrupted 4-step run (parameters, optimizer, method state, RNG).

The loss receives random projections of random views for each model
output the method declares in ``method.loss_inputs`` (default
'embeddings'; BYOL: 'predictions' and 'targets'); gradients are checked
w.r.t. each of them (zero on both sides for an input the loss must not
differentiate, such as a momentum target).

Tolerances (float32 against float64 or another summation order): values
1e-5 and gradients 1e-4 relative to the largest entry; parameters after a
train step 1e-4 relative / 1e-6 absolute; resume: bit-identical.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clrjax import config as config_lib, methods, parallel, train
from clrjax.data import pipeline
from tests.losses.cases import assert_close
from tests.methods.references import REFERENCES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N, D_IN, D = 16, 10, 8       # D = 8: column_split layouts divide it on 8 devices
NUM_LABELS = 4               # repeated labels: SupCon has several positives per anchor
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4
METHODS = methods.names()


def method_config(name: str):
    """The method's digits preset: its own config file if it has one, else configs/default.py."""
    own = os.path.join(ROOT, "configs", f"{name}.py")
    spec = f"{own}:digits" if os.path.exists(own) else os.path.join(ROOT, "configs", f"default.py:digits,method={name}")
    return config_lib.load_config_file(spec)


@functools.lru_cache(maxsize=None)
def _setup(name):
    """(method, loss kwargs, state config) of a method's digits preset, the embedding dim set to D."""
    config = method_config(name)
    config.projector.out_dim = D
    return methods.get(name), config_lib.loss_kwargs(config), config


def _inputs(seed=0, loss_inputs=("embeddings",)):
    """x [N, 2, D_IN] per-view inputs, W {input: [D_IN, D]}, labels [N] in NUM_LABELS classes.

    One W per model output the method's loss reads (``method.loss_inputs``):
    the first is the same W for every method; further ones (BYOL's
    'targets', ...) are W plus an independent perturbation, so each input
    is a different, correlated projection of the same views.
    """
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, 2, D_IN))
    x[:, 1] = x[:, 0] + 0.5 * rng.normal(size=(N, D_IN))  # two correlated views
    w = rng.normal(size=(D_IN, D)) / np.sqrt(D_IN) * np.where(np.arange(D) % 2, 0.5, 2.0)
    labels = rng.integers(0, NUM_LABELS, size=N).astype(np.int32)
    ws = {loss_inputs[0]: w}
    for i, key in enumerate(loss_inputs[1:]):
        extra = np.random.default_rng([seed, i + 1]).normal(size=(D_IN, D)) / np.sqrt(D_IN)
        ws[key] = w + 0.5 * extra
    return x, ws, labels


def _embed(x, ws, scale=1.0):
    """{input: x @ W_input * scale} [N, 2, D] (NumPy or JAX, per x)."""
    return {key: x @ w * scale for key, w in ws.items()}


def _reference_input(method, z):
    """What a reference receives: the array of a method's only loss input, else the dict of them."""
    return z[method.loss_inputs[0]] if len(method.loss_inputs) == 1 else z


def _batch(labels):
    return {"label": jnp.asarray(labels), "index": jnp.arange(len(labels), dtype=jnp.int32)}


def _run(method, kwargs, z, labels, state, axis_name=None):
    """The method's loss on the dict ``z`` of its loss inputs."""
    return method.loss(z, _batch(labels), state, axis_name=axis_name, **kwargs)


def _max_abs(tree):
    return max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(tree))


def test_every_method_has_a_reference():
    missing = [name for name in METHODS if name not in REFERENCES]
    assert not missing, f"register a float64 reference in tests/methods/references.py for {missing}"


@pytest.mark.parametrize("name", METHODS)
def test_two_steps_match_float64_reference(name):
    method, kwargs, config = _setup(name)
    x, ws, labels = _inputs(loss_inputs=method.loss_inputs)
    state32 = method.init_state(config, {})
    state64 = jax.tree.map(lambda a: np.asarray(a, np.float64), state32)
    for step in range(2):  # the second step starts from the carried state
        z = _embed(x, ws, 1.0 + 0.1 * step)
        loss, state32, _ = _run(method, kwargs, jax.tree.map(jnp.float32, z), labels, state32)
        ref_loss, state64 = REFERENCES[name](_reference_input(method, z), labels, state64, kwargs, np)
        assert_close(loss, ref_loss, VALUE_RTOL, f"{name} loss at step {step}")
        jax.tree.map(lambda a, b: assert_close(a, b, VALUE_RTOL, f"{name} state"), state32, state64)


@pytest.mark.parametrize("name", METHODS)
def test_gradient_matches_float64_autodiff_of_reference(name):
    method, kwargs, config = _setup(name)
    x, ws, labels = _inputs(seed=3, loss_inputs=method.loss_inputs)
    z = _embed(x, ws)
    state = method.init_state(config, {})
    grad32 = jax.grad(lambda v: _run(method, kwargs, v, labels, state)[0])(jax.tree.map(jnp.float32, z))
    with jax.enable_x64(True):
        state64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), state)
        grad64 = jax.device_get(jax.grad(lambda v: REFERENCES[name](_reference_input(method, v), labels, state64,
                                                                    kwargs, jnp)[0])(jax.tree.map(jnp.asarray, z)))
    assert _max_abs(grad64) > 1e-4, "the comparison must not be vacuous"
    for key in method.loss_inputs:  # an input the loss must not differentiate (a target) has zero gradient on both sides
        assert_close(grad32[key], grad64[key], GRAD_RTOL, f"{name} gradient w.r.t. {key}")


def _objective(method, kwargs, axis_name):
    """(W, x, dz, labels, state) -> (loss, (new_state, metrics)); W and dz (zero row offsets) are dicts
    over the method's loss inputs."""
    def objective(w, x, dz, labels, state):
        z = {key: jnp.einsum("nvi,id->nvd", x, w[key]) + dz[key] for key in w}
        loss, new_state, metrics = method.loss(z, _batch_local(labels), state,
                                               axis_name=axis_name, **kwargs)
        return loss, (new_state, metrics)
    return objective


def _batch_local(labels):
    return {"label": labels, "index": jnp.zeros_like(labels)}


def _arguments(name):
    method, kwargs, config = _setup(name)
    x, ws, labels = _inputs(seed=1, loss_inputs=method.loss_inputs)
    args = (jax.tree.map(jnp.float32, ws), jnp.float32(x), {key: jnp.zeros((N, 2, D), jnp.float32) for key in ws},
            jnp.asarray(labels), method.init_state(config, {}))
    return method, kwargs, args


@functools.lru_cache(maxsize=None)
def _one_device(name):
    method, kwargs, args = _arguments(name)
    return jax.jit(jax.value_and_grad(_objective(method, kwargs, None), argnums=(0, 2), has_aux=True))(*args)


@pytest.mark.parametrize("k", [2, 8])
@pytest.mark.parametrize("name", METHODS)
def test_shard_map_equals_one_device(name, k):
    method, kwargs, args = _arguments(name)
    (loss, (state, metrics)), grads = _one_device(name)
    mesh = Mesh(np.array(jax.devices()[:k]), ("data",))
    objective = _objective(method, kwargs, "data")

    def per_shard(*a):
        value, (new_state, shard_metrics) = objective(*a)
        expose = lambda t: jax.tree.map(lambda v: v[None], t)  # noqa: E731 - every shard's copy
        return value[None], (expose(new_state), expose(shard_metrics))

    rows = P("data")
    mapped = jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), rows, rows, rows, P()),
                           out_specs=(rows, (rows, rows)))

    def mean_over_shards(*a):
        values, aux = mapped(*a)
        return jnp.mean(values), (values, aux)

    (_, (values, (states, shard_metrics))), shard_grads = jax.jit(jax.value_and_grad(
        mean_over_shards, argnums=(0, 2), has_aux=True))(*args)
    np.testing.assert_array_equal(values, np.full(k, values[0]))  # one global value
    assert_close(values[0], loss, VALUE_RTOL, "loss")
    for key, value in metrics.items():
        np.testing.assert_array_equal(shard_metrics[key], np.full(k, shard_metrics[key][0]))
        assert_close(shard_metrics[key][0], value, 1e-4 if key == "rankme" else VALUE_RTOL, key)
    jax.tree.map(lambda s, ref: assert_close(s[0], ref, VALUE_RTOL, "state"), states, state)
    for what, g, sg in zip(("W", "rows of z"), grads, shard_grads):
        assert _max_abs(g) > 0
        for key in g:
            assert_close(sg[key], g[key], GRAD_RTOL if what == "W" else VALUE_RTOL, f"{what} ({key})")


@pytest.mark.parametrize("name", METHODS)
def test_pmap_with_pmean_of_parameter_gradient(name):
    k = 4
    method, kwargs, (w, x, dz, labels, state) = _arguments(name)
    (loss, _), (w_grad, _) = _one_device(name)
    objective = _objective(method, kwargs, "data")

    def device_step(w, x, dz, labels, state):
        (value, _), grad = jax.value_and_grad(objective, has_aux=True)(w, x, dz, labels, state)
        return value, jax.lax.pmean(grad, "data")

    replicate = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (k,) + a.shape), t)  # noqa: E731
    split = lambda a: a.reshape((k, -1) + a.shape[1:])  # noqa: E731
    values, w_grads = jax.pmap(device_step, axis_name="data", devices=jax.devices()[:k])(
        replicate(w), split(x), jax.tree.map(split, dz), split(labels), replicate(state))
    for device in range(k):
        assert_close(values[device], loss, VALUE_RTOL, "loss")
        for key in w_grad:
            assert_close(w_grads[key][device], w_grad[key], GRAD_RTOL, f"W gradient ({key})")


# --------------------------------------------------------------------------- through the trainer


def tiny_config(name, **overrides):
    """The method's digits preset shrunk to a few milliseconds per step."""
    base = {
        "model.widths": (8, 16), "projector.hidden_dims": (32,), "projector.out_dim": 16,
        "batch_size": 32, "num_steps": 4, "log_every_steps": 1, "checkpoint.every_steps": 100,
        "checkpoint.async_save": False, "eval.final": False,
        # SGD keeps float32 round-off differences proportional; Adam's g/sqrt(v) can amplify them.
        "optimizer.name": "sgd", "optimizer.lr": 0.05, "optimizer.warmup_epochs": 0.0,
    }
    base.update(overrides)
    return config_lib.apply_overrides(method_config(name), base)


def _train_steps(config, num_devices, steps):
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    exp = train.build_experiment(config, mesh)
    state, step_fn = train.init_train_state(exp), train.make_train_step(exp)
    initial_params = jax.device_get(state.params)  # the step donates the state's buffers
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed, prefetch=0)
    losses = []
    for _ in range(steps):
        state, step_metrics = step_fn(state, parallel.host_to_global(train.model_batch(next(loader)), mesh))
        losses.append(float(step_metrics["loss"]))
    loader.close()
    return jax.device_get(state), losses, initial_params


# The full step is method-generic around the method's forward, loss and after_update: the
# default suite runs one method of each interface shape (labels, a queue in the method state, a
# momentum target with a predictor; a stateless two-view step is tests/test_train.py's 4-vs-1-device
# and tests/test_invariance.py's 2/4/8-device SimCLR trajectories); the rest are marked slow. Every
# method's loss is checked on 1 vs 2/8 devices above (values, state and gradients).
STEP_SAMPLE = ("supcon", "moco_v2", "byol")


@pytest.mark.parametrize("name", [n if n in STEP_SAMPLE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in METHODS])
def test_train_step_on_8_devices_equals_1_device(name):
    config = tiny_config(name)
    (state8, loss8, _), (state1, loss1, initial) = _train_steps(config, 8, 1), _train_steps(config, 1, 1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for part in ("params", "batch_stats", "method_state"):
        # atol 2e-6: one reduction order per device count (8 partial sums vs 1) on parameters of order 0.1-1.
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6),
                     getattr(state8, part), getattr(state1, part))
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state1.params, initial)
    assert max(jax.tree.leaves(moved)) > 0, "the step must change the parameters"


# Resume is the trainer's checkpointing of whatever the state holds; the default suite resumes one
# method per kind of state: a queue beside an EMA target (moco_v2), two towers with text input and
# learnable scalars (siglip); the rest are marked slow. A state with no method part resumes in
# tests/test_preemption.py (kill -9 and SIGTERM), a predictor with its target in
# tests/test_multicrop.py (BYOL).
RESUME_SAMPLE = ("moco_v2", "siglip")


@pytest.mark.parametrize("name", [n if n in RESUME_SAMPLE else pytest.param(n, marks=pytest.mark.slow)
                                  for n in METHODS])
def test_resume_is_bit_exact(name, tmp_path):
    # Adam and warmup: everything the checkpoint must carry, method state included.
    config = tiny_config(name, **{"optimizer.name": "adamw", "optimizer.lr": 1e-3,
                                  "optimizer.warmup_epochs": 0.05})
    whole = jax.device_get(train.train(config, str(tmp_path / "whole")).state)
    for stop in (2, None):
        resumed = train.train(config, str(tmp_path / "resumed"), stop_after_steps=stop)
    pieces = jax.device_get(resumed.state)
    assert int(pieces.step) == int(whole.step) == 4
    jax.tree.map(np.testing.assert_array_equal, pieces, whole)
