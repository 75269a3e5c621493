"""Multi-crop (SwAV, Caron et al. 2020, sec. 3.2): views, forward per resolution, losses, ViT, trainer.

* The multi-crop losses (clrjax/losses/multicrop.py: BYOL, MoCo v3, the
  multi-positive SimCLR / DCL / SupCon) against naive float64 NumPy loops
  over every (global crop i, crop j != i) pair written from their
  definitions, on random inputs: values to 1e-5 relative; gradients w.r.t.
  global and local crops against float64 central differences of the loops
  (step 1e-6) at sampled entries, to 1e-4 of the largest gradient entry.
* With no local crops each equals the existing two-view loss (the methods
  call the two-view losses then; this checks the multi-crop definitions
  extend them).
* 1 vs 8 simulated devices under shard_map: value and gradient (1e-5 / 1e-4);
  under pmap: each device's value and the pmean of a replicated parameter's
  gradient. The methods (byol, moco_v3, simclr, supcon) send [B, 2 + V, d]
  outputs to these losses.
* Views: 0 local crops is the two-view path bit for bit; global crops are
  the two views with global_scale; each crop has its own key; views do not
  depend on which examples share the batch.
* Forward: each resolution is its own encoder batch (BatchNorm statistics
  per resolution).
* ViT position embeddings: identity at the native grid, the right shape at
  a smaller one, constants stay constant.
* Trainer: BYOL 2 + 2 crops on digits, 8 devices equal 1 device after 2
  steps, and a run stopped and resumed ends bit-identical.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from clrjax import config as config_lib, methods, train
from clrjax.data import augment
from clrjax.losses import byol_loss, moco_v3_loss, simclr_loss, supcon_loss
from clrjax.losses.multicrop import (byol_multicrop_loss, crop_pairs, moco_v3_multicrop_loss,
                                     multicrop_contrastive_loss)
from clrjax.methods import multicrop
from clrjax.models import vit
from tests.methods.test_harness import _train_steps, tiny_config

N, M, D = 16, 5, 8          # 16 images, 2 global + 3 local crops, 8-d outputs
T = 0.2
VALUE_RTOL, GRAD_RTOL = 1e-5, 1e-4


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random(seed, m=M, n=N, d=D):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 1, d))
    online = base + 0.7 * rng.normal(size=(n, m, d))     # crops of one image correlate
    target = base + 0.7 * rng.normal(size=(n, 2, d))
    labels = rng.integers(0, 4, size=n).astype(np.int32)
    return online, target, labels


# --------------------------------------------------------------------------- float64 references (loops)


def ref_byol(p, t):
    """(2 / |P|) (1 / N) sum_b sum_{i global, j != i} (2 - 2 cos(p_bj, t_bi))."""
    n, m, _ = p.shape
    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(m):
            if j == i:
                continue
            pairs += 1
            for b in range(n):
                total += 2.0 - 2.0 * float(_unit(p[b, j]) @ _unit(t[b, i]))
    return 2.0 / pairs * total / n


def ref_moco_v3(q, k, temperature):
    """(2 / |P|) sum_{(i, j)} 2T (1/N) sum_b -log softmax_c(u(q_bj) . u(k_ci) / T)[b]."""
    n, m, _ = q.shape
    total, pairs = 0.0, 0
    for i in range(2):
        for j in range(m):
            if j == i:
                continue
            pairs += 1
            for b in range(n):
                logits = np.array([_unit(q[b, j]) @ _unit(k[c, i]) for c in range(n)]) / temperature
                total += 2 * temperature * (np.log(np.sum(np.exp(logits))) - logits[b]) / n
    return 2.0 / pairs * total


def ref_contrastive(z, labels, temperature, decoupled=False):
    """Mean over anchors (b, j) of logsumexp over A - mean over P, columns = global crops (c, i)."""
    n, m, _ = z.shape
    y = np.arange(n) if labels is None else labels
    total = 0.0
    for b in range(n):
        for j in range(m):
            denominator, positives = [], []
            for i in range(2):
                for c in range(n):
                    if j == i and c == b:
                        continue                       # the anchor itself
                    s = float(_unit(z[b, j]) @ _unit(z[c, i])) / temperature
                    if y[c] == y[b]:
                        positives.append(s)
                    if not (decoupled and y[c] == y[b]):
                        denominator.append(s)
            total += np.log(np.sum(np.exp(denominator))) - np.mean(positives)
    return total / (n * m)


def test_crop_pairs_are_every_crop_against_the_other_global_crops():
    assert crop_pairs(2) == [(0, 1), (1, 0)]
    assert crop_pairs(4) == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]


# --------------------------------------------------------------------------- loss cases


def _byol(online, target, labels, axis_name=None):
    return byol_multicrop_loss(online, target, axis_name=axis_name)[0]


def _moco(online, target, labels, axis_name=None):
    return moco_v3_multicrop_loss(online, target, temperature=T, axis_name=axis_name)[0]


def _simclr(online, target, labels, axis_name=None, decoupled=False):
    return multicrop_contrastive_loss(online, None, temperature=T, decoupled=decoupled, axis_name=axis_name)[0]


def _supcon(online, target, labels, axis_name=None):
    return multicrop_contrastive_loss(online, labels, temperature=T, axis_name=axis_name)[0]


_dcl = functools.partial(_simclr, decoupled=True)

CASES = {
    "byol": (_byol, lambda o, t, y: ref_byol(o, t)),
    "moco_v3": (_moco, lambda o, t, y: ref_moco_v3(o, t, T)),
    "simclr": (_simclr, lambda o, t, y: ref_contrastive(o, None, T)),
    "simclr_decoupled": (_dcl, lambda o, t, y: ref_contrastive(o, None, T, decoupled=True)),
    "supcon": (_supcon, lambda o, t, y: ref_contrastive(o, y, T)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_loss_equals_float64_loop_over_crop_pairs(name):
    run, ref = CASES[name]
    for seed in (0, 1):
        online, target, labels = _random(seed)
        got = float(run(jnp.float32(online), jnp.float32(target), jnp.asarray(labels)))
        np.testing.assert_allclose(got, ref(online, target, labels), rtol=VALUE_RTOL)


TWO_VIEW = {
    "byol": lambda o, t, y: byol_loss(o[:, 0], o[:, 1], t[:, 0], t[:, 1])[0],
    "moco_v3": lambda o, t, y: moco_v3_loss(o[:, 0], o[:, 1], t[:, 0], t[:, 1], temperature=T)[0],
    "simclr": lambda o, t, y: simclr_loss(o[:, 0], o[:, 1], temperature=T)[0],
    "simclr_decoupled": lambda o, t, y: simclr_loss(o[:, 0], o[:, 1], temperature=T, decoupled=True)[0],
    "supcon": lambda o, t, y: supcon_loss(o[:, 0], o[:, 1], y, temperature=T)[0],
}


@pytest.mark.parametrize("name", list(CASES))
def test_two_crops_equal_the_two_view_loss(name):
    online, target, labels = (jnp.float32(a) if a.dtype != np.int32 else jnp.asarray(a) for a in _random(2, m=2))
    np.testing.assert_allclose(float(CASES[name][0](online, target, labels)),
                               float(TWO_VIEW[name](online, target, labels)), rtol=VALUE_RTOL)


def _sharded_value_and_grad(run, num_devices):
    """value and d(loss)/d(online) of the loss with its rows split over ``num_devices`` (shard_map)."""
    mesh = Mesh(np.array(jax.devices()[:num_devices]), ("data",))

    def per_shard(online, target, labels):
        return run(online, target, labels, axis_name="data")

    sharded = jax.shard_map(per_shard, mesh=mesh, in_specs=(P("data"), P("data"), P("data")), out_specs=P())
    return jax.jit(jax.value_and_grad(sharded))


@pytest.mark.parametrize("name", list(CASES))
def test_eight_devices_equal_one_in_value_and_gradient(name):
    online, target, labels = _random(3)
    args = (jnp.float32(online), jnp.float32(target), jnp.asarray(labels))
    (v1, g1), (v8, g8) = (_sharded_value_and_grad(CASES[name][0], k)(*args) for k in (1, 8))
    np.testing.assert_allclose(float(v8), float(v1), rtol=VALUE_RTOL)
    g1, g8 = np.asarray(g1), np.asarray(g8)
    assert np.max(np.abs(g1)) > 0 and np.all(np.abs(g1[:, 2:]).sum(axis=(1, 2)) > 0), "local crops get a gradient"
    np.testing.assert_allclose(g8, g1, atol=GRAD_RTOL * np.max(np.abs(g1)))


FD_ENTRIES = ((0, 0, 0), (3, 1, 2), (5, 2, 1), (9, 4, 7), (15, 3, 5))   # (image, crop, dim)


@pytest.mark.parametrize("name", list(CASES))
def test_gradient_equals_float64_central_differences_of_the_loop(name):
    run, ref = CASES[name]
    online, target, labels = _random(5)
    grad = np.asarray(jax.grad(run)(jnp.float32(online), jnp.float32(target), jnp.asarray(labels)))
    eps = 1e-6
    for entry in FD_ENTRIES:
        plus, minus = online.copy(), online.copy()
        plus[entry] += eps
        minus[entry] -= eps
        numeric = (ref(plus, target, labels) - ref(minus, target, labels)) / (2 * eps)
        assert abs(grad[entry] - numeric) <= GRAD_RTOL * np.max(np.abs(grad)), (entry, grad[entry], numeric)


@pytest.mark.parametrize("name", ["byol", "moco_v3", "supcon"])
def test_pmap_with_pmean_of_parameter_gradient(name):
    """Under jax.pmap (8 devices) each device's loss and the pmean of a replicated W's gradient
    (online = x W) equal the one-device ones."""
    run = CASES[name][0]
    online, target, labels = _random(6)
    w = jnp.float32(np.random.default_rng(7).normal(size=(D, D)) / np.sqrt(D))

    def objective(w, x, t, y, axis_name=None):
        return run(jnp.einsum("nmi,id->nmd", x, w), t, y, axis_name=axis_name)

    args = (jnp.float32(online), jnp.float32(target), jnp.asarray(labels))
    loss, grad = jax.jit(jax.value_and_grad(objective))(w, *args)

    def device_step(w, x, t, y):
        value, g = jax.value_and_grad(functools.partial(objective, axis_name="data"))(w, x, t, y)
        return value, jax.lax.pmean(g, "data")

    split = lambda a: a.reshape((8, -1) + a.shape[1:])  # noqa: E731
    values, grads = jax.pmap(device_step, axis_name="data", devices=jax.devices()[:8])(
        jnp.broadcast_to(w, (8,) + w.shape), *map(split, args))
    np.testing.assert_allclose(np.asarray(values), float(loss), rtol=VALUE_RTOL)
    for device in range(8):
        np.testing.assert_allclose(np.asarray(grads[device]), np.asarray(grad), atol=GRAD_RTOL * float(jnp.max(jnp.abs(grad))))


@pytest.mark.parametrize("name", ["byol", "moco_v3", "simclr", "supcon"])
def test_methods_send_multicrop_outputs_to_the_multicrop_loss(name):
    method = methods.get(name)
    online, target, labels = _random(8)
    kwargs = {"temperature": T} if name != "byol" else {}
    outputs = ({"predictions": jnp.float32(online), "targets": jnp.float32(target)} if name in ("byol", "moco_v3")
               else {"embeddings": jnp.float32(online)})
    loss, _, _ = method.loss(outputs, {"label": jnp.asarray(labels)}, {}, **kwargs)
    np.testing.assert_allclose(float(loss), float(CASES[name][0](jnp.float32(online), jnp.float32(target),
                                                                 jnp.asarray(labels))), rtol=1e-6)
    assert method.supports_multicrop


def test_targets_get_no_gradient():
    online, target, _ = _random(4)
    for run in (_byol, _moco):
        grad = jax.grad(lambda t: run(jnp.float32(online), t, None), argnums=0)(jnp.float32(target))
        assert float(jnp.max(jnp.abs(grad))) == 0.0


# --------------------------------------------------------------------------- views


def _augment_config(num_local, **multicrop_fields):
    config = tiny_config("byol", **{"augment.multicrop.num_local": num_local,
                                    **{f"augment.multicrop.{k}": v for k, v in multicrop_fields.items()}})
    return config.augment.to_dict()


def _examples(n=6):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    return {"image": jnp.asarray(images), "index": jnp.arange(100, 100 + n, dtype=jnp.int32),
            "label": jnp.zeros(n, jnp.int32)}


def _jitted_views(method, cfg):
    return jax.jit(lambda examples, key: method.make_views(examples, key, cfg))


def test_no_local_crops_is_the_two_view_path_bit_for_bit():
    method, key, examples = methods.get("byol"), jax.random.PRNGKey(3), _examples()
    cfg = _augment_config(0)
    got = _jitted_views(method, cfg)(examples, key)
    want = jax.jit(lambda e, k: augment.views(e["image"], e["index"], k, cfg, 2))(examples, key)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_global_crops_are_the_two_views_and_every_crop_has_its_own_key():
    method, key, examples = methods.get("byol"), jax.random.PRNGKey(3), _examples()
    cfg = _augment_config(3, local_size=4, local_scale=(0.1, 0.3), global_scale=tuple(
        _augment_config(0)["crop_scale"]))
    make = _jitted_views(method, cfg)
    views = make(examples, key)
    assert views["global"].shape == (6, 2, 8, 8, 1) and views["local"].shape == (6, 3, 4, 4, 1)
    two = _jitted_views(method, _augment_config(0))(examples, key)
    np.testing.assert_array_equal(np.asarray(views["global"]), np.asarray(two))
    local = np.asarray(views["local"])
    assert all(np.max(np.abs(local[:, a] - local[:, b])) > 0 for a, b in ((0, 1), (0, 2), (1, 2)))
    # per-example keys: an example's crops do not depend on its position in the batch (or the shard)
    order = np.array([3, 0, 5, 1, 4, 2])
    shuffled = make({k: v[order] for k, v in examples.items()}, key)
    for name in ("global", "local"):
        np.testing.assert_array_equal(np.asarray(shuffled[name]), np.asarray(views[name])[order])


def test_local_crop_probabilities_are_their_own():
    global_cfg, local_cfg = multicrop._crop_configs(
        _augment_config(2, local_blur_prob=0.5, local_solarize_prob=0.25),
        multicrop.settings(_augment_config(2, local_blur_prob=0.5, local_solarize_prob=0.25)))
    assert local_cfg["blur_prob"][2:] == (0.5, 0.5) and local_cfg["solarize_prob"][2:] == (0.25, 0.25)
    assert global_cfg["blur_prob"][:2] == tuple(_augment_config(0)["blur_prob"])


# --------------------------------------------------------------------------- forward


def test_each_resolution_is_its_own_encoder_batch():
    """Global features equal the encoder on the global crops alone (BatchNorm statistics per resolution),
    and the running statistics are updated once per resolution, global crops first."""
    config = tiny_config("byol", **{"augment.multicrop.num_local": 2, "augment.multicrop.local_size": 4})
    method = methods.get("byol")
    model = method.build_model(config, 10)
    variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x, train=False))(jnp.zeros((2, 8, 8, 1)))
    views = _jitted_views(method, config.augment.to_dict())(_examples(8), jax.random.PRNGKey(1))
    out, stats = jax.jit(lambda v, x: method.forward(model, v, x, method.init_state(config, v), train=True))(
        variables, views)
    assert out["features"].shape[:2] == (8, 4) and out["targets"].shape[:2] == (8, 2)

    @jax.jit
    def encode(v, bs):
        flat = v.reshape((-1,) + v.shape[2:])
        return model.apply({"params": variables["params"], "batch_stats": bs}, flat, True,
                           method=multicrop._encode, mutable=["batch_stats"])

    h_global, after_global = encode(views["global"], variables["batch_stats"])
    np.testing.assert_allclose(np.asarray(out["features"][:, :2]).reshape(16, -1), np.asarray(h_global),
                               rtol=1e-5, atol=1e-6)
    h_local, after_local = encode(views["local"], after_global["batch_stats"])
    np.testing.assert_allclose(np.asarray(out["features"][:, 2:]).reshape(16, -1), np.asarray(h_local),
                               rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 stats["encoder"], after_local["batch_stats"]["encoder"])


# --------------------------------------------------------------------------- ViT position embeddings


def test_vit_position_embeddings_identity_at_native_grid_and_resized_elsewhere():
    rng = np.random.default_rng(0)
    pos = jnp.float32(rng.normal(size=(1, 1 + 16, 6)))               # a 4 x 4 grid
    assert vit.interpolate_pos_embed(pos, (4, 4)) is pos
    small = vit.interpolate_pos_embed(pos, (2, 3))
    assert small.shape == (1, 1 + 6, 6)
    np.testing.assert_array_equal(np.asarray(small[:, 0]), np.asarray(pos[:, 0]))   # cls kept
    constant = jnp.ones((1, 17, 6)) * 0.3
    np.testing.assert_allclose(np.asarray(vit.interpolate_pos_embed(constant, (2, 2))), 0.3, rtol=1e-6)


def test_vit_takes_a_smaller_crop_than_it_was_initialised_with():
    model = vit.ViT(dim=16, depth=1, num_heads=2, patch_size=4)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 1)))
    assert variables["params"]["pos_embed"].shape == (1, 17, 16)
    x = jnp.float32(np.random.default_rng(1).normal(size=(2, 8, 8, 1)))
    features = jax.jit(model.apply)(variables, x)          # a 2 x 2 grid from the 4 x 4 embeddings
    assert features.shape == (2, 16) and np.all(np.isfinite(np.asarray(features)))
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 10, 10, 1)))


# --------------------------------------------------------------------------- through the trainer


MULTICROP = {"augment.multicrop.num_local": 2, "augment.multicrop.local_size": 4,
             "augment.multicrop.local_scale": (0.1, 0.4), "augment.multicrop.global_scale": (0.4, 1.0)}


# slow: the multi-crop losses' 1 vs 8 device equality (values and gradients) is tested above
@pytest.mark.slow
def test_byol_2_plus_2_crops_on_8_devices_equals_1_device():
    config = tiny_config("byol", **MULTICROP)
    config_lib.validate_config(config, num_devices=8)
    (state8, loss8, _), (state1, loss1, _) = _train_steps(config, 8, 2), _train_steps(config, 1, 2)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for part in ("params", "batch_stats", "method_state"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     getattr(state8, part), getattr(state1, part))


def test_byol_multicrop_resume_is_bit_exact(tmp_path):
    # The config of the test above: the compilation cache serves its 8-device step program here.
    config = tiny_config("byol", **MULTICROP)
    whole = jax.device_get(train.train(config, str(tmp_path / "whole")).state)
    for stop in (2, None):
        resumed = train.train(config, str(tmp_path / "resumed"), stop_after_steps=stop)
    pieces = jax.device_get(resumed.state)
    assert int(pieces.step) == int(whole.step) == 4
    jax.tree.map(np.testing.assert_array_equal, pieces, whole)


# slow: gradient caching of pytree views is also tested by the two-tower methods' test
@pytest.mark.slow
def test_gradient_caching_with_multicrop_equals_full_batch():
    """The crop pytree is split by rows: 4 micro-batches give the full-batch gradient (a ViT without
    cross-example statistics, so the two are the same objective; tolerance as tests/test_gradient_cache.py)."""
    from clrjax.models import encoders
    from tests.test_gradient_cache import BATCH, MICRO_VIT, assert_trees_close, exact_config, grads_and_aux

    registered = "vit_micro" in encoders.ENCODERS
    if not registered:
        encoders.ENCODERS.register(MICRO_VIT)
    try:
        (grads, stats, aux), _ = grads_and_aux(exact_config("byol", "vit", BATCH // 4, **MULTICROP), 1)
        (want_grads, want_stats, want_aux), _ = grads_and_aux(exact_config("byol", "vit", 0, **MULTICROP), 1)
    finally:
        if not registered:
            encoders.ENCODERS.unregister("vit_micro")
    assert max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads)) > 0
    assert_trees_close(grads, want_grads, "multi-crop gradient")
    assert_trees_close(aux, want_aux, "multi-crop loss, metrics and method state")
