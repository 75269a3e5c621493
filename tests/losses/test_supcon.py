"""SupCon (Khosla et al. 2020, eq. 2, L_out): paper reference, SimCLR limit, devices, chunks.

Tolerances (relative to the largest entry, see cases.assert_close):
  VALUE_RTOL 1e-5  float32 loss / metrics vs float64 NumPy, or vs another
                   float32 path with a different summation order;
  GRAD_RTOL  1e-4  float32 gradients vs float64 autodiff of the reference
                   (as test_one_device.py);
  RANKME_RTOL 1e-4 the float32 SVD behind the RankMe monitor.
Float32-vs-float32 comparisons of gradients (chunked, sharded, SimCLR) use
VALUE_RTOL: both sides round the same float32 products.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from clrjax.losses import simclr_loss
from clrjax.losses.supcon import supcon_loss
from tests.losses import reference
from tests.losses.cases import assert_close, embeddings

N, D_IN, D, CLASSES = 16, 6, 8, 4  # 2N = 32 columns; n_local = 2 at K = 8
TEMPERATURE = 0.2
VALUE_RTOL = 1e-5
GRAD_RTOL = 1e-4
RANKME_RTOL = 1e-4


def _labels(kind, n=N, seed=0):
    """'classes': 4 classes of unequal sizes (|P(i)| varies); 'distinct'; 'one_class'."""
    if kind == "classes":
        labels = np.random.default_rng(seed).integers(0, CLASSES, size=n)
        assert len(set(np.bincount(labels))) > 1  # unequal classes: |P(i)| really varies
        return labels.astype(np.int32)
    if kind == "distinct":
        return np.arange(n, dtype=np.int32)[::-1].copy()
    if kind == "one_class":
        return np.full(n, 7, np.int32)
    raise ValueError(kind)


def _reference_metrics(z_a, z_b, labels):
    """Top-1 accuracy and mean |P(i)| on the full float64 2N x 2N matrix."""
    z = np.concatenate([z_a, z_b])
    u = z / np.linalg.norm(z, axis=1, keepdims=True)
    sims = u @ u.T
    np.fill_diagonal(sims, -np.inf)
    y = np.concatenate([labels, labels])
    same = y[:, None] == y[None, :]
    return {"accuracy": np.mean(y[np.argmax(sims, axis=1)] == y),
            "mean_positives": np.mean(same.sum(axis=1) - 1)}


@functools.partial(jax.jit, static_argnames=("temperature", "chunk_size", "monitors"))
def _value_and_grads(z_a, z_b, labels, temperature=TEMPERATURE, chunk_size=None,
                     monitors=False):
    """((loss, metrics), (d/dz_a, d/dz_b)) on one device; jit'ed once per static config."""
    def loss(a, b):
        return supcon_loss(a, b, labels, temperature=temperature, chunk_size=chunk_size,
                           monitors=monitors)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(z_a, z_b)


def _f32(*arrays):
    return tuple(jnp.float32(a) for a in arrays)


# ---------------------------------------------------------------- paper reference

@pytest.mark.parametrize("kind", ["classes", "one_class", "distinct"])
def test_value_and_metrics_match_float64_reference(kind):
    z_a, z_b = embeddings(N, D, seed=1)
    labels = _labels(kind)
    (loss, metrics), _ = _value_and_grads(*_f32(z_a, z_b), labels, monitors=True)
    assert_close(loss, reference.supcon(z_a, z_b, labels, TEMPERATURE), VALUE_RTOL, "loss")
    for name, value in _reference_metrics(z_a, z_b, labels).items():
        assert_close(metrics[name], value, VALUE_RTOL, name)
    for name, value in reference.collapse_monitors(z_a).items():
        assert_close(metrics[name], value, RANKME_RTOL, name)
    if kind == "classes":  # neither metric is at a trivial value
        assert 0.0 < float(metrics["accuracy"]) < 1.0
        assert float(metrics["mean_positives"]) > 1.0


def test_gradient_matches_float64_autodiff_of_reference():
    z_a, z_b = embeddings(N, D, seed=3)
    labels = _labels("classes", seed=3)
    _, grads32 = _value_and_grads(*_f32(z_a, z_b), labels)
    with jax.enable_x64(True):
        grads64 = jax.grad(lambda a, b: reference.supcon(a, b, labels, TEMPERATURE, xp=jnp),
                           argnums=(0, 1))(jnp.asarray(z_a), jnp.asarray(z_b))
        grads64 = [np.asarray(g) for g in grads64]
    assert np.max(np.abs(grads64[0])) > 1e-3  # the comparison is not vacuous
    for name, g32, g64 in zip(("z_a", "z_b"), grads32, grads64):
        assert_close(g32, g64, GRAD_RTOL, name)


def test_distinct_labels_equal_simclr_nt_xent():
    """With |P(i)| = 1 eq. 2 is NT-Xent; the mean-over-anchors convention makes it exact."""
    z_a, z_b = _f32(*embeddings(N, D, seed=4))
    (loss, metrics), grads = _value_and_grads(z_a, z_b, _labels("distinct"))
    simclr = jax.jit(jax.value_and_grad(
        lambda a, b: simclr_loss(a, b, temperature=TEMPERATURE, monitors=False), argnums=(0, 1),
        has_aux=True))
    (s_loss, s_metrics), s_grads = simclr(z_a, z_b)
    assert_close(loss, s_loss, VALUE_RTOL, "loss")
    assert_close(metrics["accuracy"], s_metrics["accuracy"], VALUE_RTOL, "accuracy")
    assert float(metrics["mean_positives"]) == 1.0
    for g, sg in zip(grads, s_grads):
        assert_close(g, sg, VALUE_RTOL, "gradient")


# ---------------------------------------------------------------- chunked = dense

def test_chunked_matches_dense_one_device():
    z_a, z_b = _f32(*embeddings(N, D, seed=5))
    labels = _labels("classes", seed=5)
    (loss, metrics), grads = _value_and_grads(z_a, z_b, labels)
    # 1: blocks entirely masked for some rows (self); 5: does not divide 2N = 32; 8 divides it.
    for chunk in (1, 5, 8):
        (c_loss, c_metrics), c_grads = _value_and_grads(z_a, z_b, labels, chunk_size=chunk)
        assert_close(c_loss, loss, VALUE_RTOL, f"loss chunk={chunk}")
        for name in metrics:
            assert_close(c_metrics[name], metrics[name], VALUE_RTOL, f"{name} chunk={chunk}")
        for g, cg in zip(grads, c_grads):
            assert_close(cg, g, VALUE_RTOL, f"grad chunk={chunk}")


def _temp_bytes(chunk_size, n=512, d=16):
    z = jax.ShapeDtypeStruct((n, d), jnp.float32)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32)
    grad = jax.grad(lambda a, b, y: supcon_loss(a, b, y, chunk_size=chunk_size,
                                                monitors=False)[0], argnums=(0, 1))
    return jax.jit(grad).lower(z, z, labels).compile().memory_analysis().temp_size_in_bytes


def test_chunking_bounds_loss_and_grad_temporaries():
    """Dense needs [2n, 2N] f32 blocks (4 MiB at n = 512); chunk 64 needs 1/16 of that."""
    dense, chunked = _temp_bytes(None), _temp_bytes(64)
    assert dense >= 2 * 512 * 2 * 512 * 4
    assert chunked < dense / 4, (chunked, dense)


# ---------------------------------------------------------------- devices

def _inputs(seed=0):
    """W [D_IN, D], x_a, x_b [N, D_IN], zero row offsets [N, D], labels [N]."""
    x_a, x_b = embeddings(N, D_IN, seed)
    w = np.random.default_rng(seed + 1).normal(size=(D_IN, D)) / np.sqrt(D_IN)
    zeros = np.zeros((N, D))
    return (*_f32(w, x_a, x_b, zeros, zeros), jnp.asarray(_labels("classes", seed=seed)))


def _objective(axis_name, chunk_size=None, monitors=True):
    """(W, x_a, x_b, dz_a, dz_b, labels) -> (loss, metrics); dz are zero row offsets."""
    def objective(w, x_a, x_b, dz_a, dz_b, labels):
        return supcon_loss(x_a @ w + dz_a, x_b @ w + dz_b, labels, temperature=TEMPERATURE,
                           chunk_size=chunk_size, axis_name=axis_name, monitors=monitors)
    return objective


@functools.lru_cache(maxsize=None)
def _one_device():
    """Dense one-device value, metrics and gradients w.r.t. (W, rows of z_a, rows of z_b)."""
    (loss, metrics), grads = jax.jit(jax.value_and_grad(
        _objective(None), argnums=(0, 3, 4), has_aux=True))(*_inputs())
    return loss, metrics, grads


def _mesh(k):
    return Mesh(np.array(jax.devices()[:k]), ("data",))


def _sharded(k, chunk_size, monitors):
    """Per-shard loss and metrics (leading axis K) and the gradient of the global loss."""
    objective = _objective("data", chunk_size, monitors)

    def per_shard(*a):
        loss, metrics = objective(*a)
        # Expose every shard's copy so the test can check they agree.
        return loss[None], jax.tree.map(lambda m: m[None], metrics)

    rows = P("data")
    mapped = jax.shard_map(per_shard, mesh=_mesh(k), in_specs=(P(),) + (rows,) * 5,
                           out_specs=(rows, rows))

    def mean_over_shards(*a):
        losses, metrics = mapped(*a)
        return jnp.mean(losses), (losses, metrics)

    (_, (losses, metrics)), grads = jax.jit(jax.value_and_grad(
        mean_over_shards, argnums=(0, 3, 4), has_aux=True))(*_inputs())
    return losses, metrics, grads


# Chunked layouts skip the monitors (shared with the dense ones) to keep the run short.
@pytest.mark.parametrize("k, chunk_size", [(2, None), (4, None), (8, None), (4, 1), (4, 7)])
def test_shard_map_equals_one_device(k, chunk_size):
    """Dense one device vs K shards, dense or chunked (7 does not divide 2N = 32)."""
    loss, metrics, grads = _one_device()
    losses, shard_metrics, shard_grads = _sharded(k, chunk_size, monitors=chunk_size is None)

    assert losses.shape == (k,)
    np.testing.assert_array_equal(losses, np.full(k, losses[0]))  # one global value
    assert_close(losses[0], loss, VALUE_RTOL, "loss")
    assert set(shard_metrics) <= set(metrics) and "mean_positives" in shard_metrics
    for name, values in shard_metrics.items():
        np.testing.assert_array_equal(values, np.full(k, values[0]))
        assert_close(values[0], metrics[name], RANKME_RTOL if name == "rankme" else VALUE_RTOL,
                     name)
    for name, g, sg in zip(("W", "rows of z_a", "rows of z_b"), grads, shard_grads):
        assert np.max(np.abs(g)) > 0
        assert_close(sg, g, VALUE_RTOL, name)


def test_outputs_replicated_with_out_specs_p():
    """Loss and metrics are provably replicated: out_specs=P() compiles (check_vma on)."""
    z_a, z_b = _f32(*embeddings(N, D, seed=6))
    labels = jnp.asarray(_labels("classes", seed=6))
    sharded = jax.shard_map(lambda a, b, y: supcon_loss(a, b, y, chunk_size=5, axis_name="data"),
                            mesh=_mesh(8), in_specs=(P("data"),) * 3, out_specs=(P(), P()))
    loss, metrics = jax.jit(sharded)(z_a, z_b, labels)
    ref_loss, ref_metrics = supcon_loss(z_a, z_b, labels, chunk_size=5)
    assert_close(loss, ref_loss, VALUE_RTOL, "loss")
    assert set(metrics) == set(ref_metrics)


def test_pmap_pmean_of_replicated_param_gradient():
    """Under pmap each device differentiates its own copy; pmean gives the W gradient."""
    k = 4
    w, x_a, x_b, _, _, labels = _inputs()
    loss, _, (w_grad, _, _) = _one_device()
    n_local = N // k

    def device_step(w, x_a, x_b, labels):
        def objective(w):
            return supcon_loss(x_a @ w, x_b @ w, labels, temperature=TEMPERATURE,
                               axis_name="data", monitors=False)[0]
        value, grad = jax.value_and_grad(objective)(w)
        return value, jax.lax.pmean(grad, "data")

    values, w_grads = jax.pmap(device_step, axis_name="data", devices=jax.devices()[:k])(
        jnp.broadcast_to(w, (k,) + w.shape), x_a.reshape(k, n_local, -1),
        x_b.reshape(k, n_local, -1), labels.reshape(k, n_local))
    for device in range(k):
        assert_close(values[device], loss, VALUE_RTOL, "loss")
        assert_close(w_grads[device], w_grad, VALUE_RTOL, "W gradient")


# ---------------------------------------------------------------- numerics and arguments

@pytest.mark.parametrize("chunk_size", [None, 6])
def test_bf16_low_temperature_is_finite_and_exact(chunk_size):
    z_a, z_b = (jnp.asarray(z, jnp.bfloat16) for z in embeddings(N, D, seed=2))
    labels = _labels("classes", seed=2)
    (loss, _), grads = _value_and_grads(z_a, z_b, labels, temperature=0.05,
                                        chunk_size=chunk_size)
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in (loss, *grads))
    assert grads[0].dtype == jnp.bfloat16
    # The math runs in float32 on the bf16-rounded inputs: compare to float64 on those.
    ref = reference.supcon(np.asarray(z_a, np.float64), np.asarray(z_b, np.float64), labels,
                           0.05)
    assert_close(loss, ref, VALUE_RTOL, "loss")


Z = jnp.ones((4, 3))
GOOD_LABELS = jnp.arange(4)


# Messages come from the shared _validation.check_labels (also used by supervised_ce_loss).
@pytest.mark.parametrize("labels, message", [
    (jnp.zeros((4, 1), jnp.int32), r"labels must have shape \(4,\).*got \(4, 1\)"),
    (jnp.zeros((3,), jnp.int32), r"labels must have shape \(4,\).*got \(3,\)"),
    ([0, 1, 2, 3], r"labels must have shape \(4,\).*got None"),
    (jnp.zeros((4,), jnp.float32), "labels must be integers, got dtype float32"),
    (jnp.zeros((4,), bool), "labels must be integers, got dtype bool"),
])
def test_bad_labels_raise(labels, message):
    with pytest.raises(ValueError, match=message):
        supcon_loss(Z, Z, labels)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size_raises(chunk_size):
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int"):
        supcon_loss(Z, Z, GOOD_LABELS, chunk_size=chunk_size)


def test_bad_temperature_and_embeddings_raise():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        supcon_loss(Z, Z, GOOD_LABELS, temperature=0.0)
    with pytest.raises(ValueError, match="z_a and z_b must have the same shape"):
        supcon_loss(Z, jnp.ones((4, 5)), GOOD_LABELS)
