"""Linear evaluation of a frozen encoder: two protocols.

``features`` protocol (CLIP, Radford et al. 2021, appendix A.3): multinomial
logistic regression on frozen, precomputed features, standardised with the
training mean/std, minimising

    J(W, b) = (1/n) sum_i CE(W^T x_i + b, y_i) + (l2 / 2) ||W||_F^2

(the bias is not penalised). This is scikit-learn's
``LogisticRegression(C=1/(n * l2))``, whose objective is ``C * sum_i CE + ||W||^2 / 2``,
divided by ``C n``. ``l2`` is chosen on a stratified held-out part of the
training split over a log-spaced grid (coarse, then refined around the best),
and the final model is refit on the whole training split. The solver is
full-batch L-BFGS (``optax.lbfgs`` with a zoom line search) run to a gradient
tolerance inside one ``jax.lax.while_loop``; successive grid points are
warm-started, from strong to weak regularisation, because the solution path is
smooth in ``log l2`` and a warm start cuts the iterations several-fold.

``augmented`` protocol (SimCLR, Chen et al. 2020, appendix B.5; BYOL, Grill et
al. 2020, appendix C.1): a linear head on the frozen encoder's features of
randomly augmented (random-resized-crop + flip) training images, trained with
SGD + Nesterov momentum 0.9 and a cosine learning-rate decay, no weight decay;
the test set is evaluated at the centre crop.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from clrjax.evaluation.features import batch_progress, extract_features, place_batch
from clrjax.parallel import batch_sharding

# 1e-6 .. 1e2, one point per decade (CLIP sweeps 1e-6 .. 1e6; on standardised
# features everything above ~1e2 is the constant, prior-only classifier).
DEFAULT_L2_GRID = tuple(float(10.0**e) for e in range(-6, 3))
# Refinement around the best coarse point, in decades: the coarse grid has one
# point per decade, so the optimum lies within half a decade of the best point.
REFINE_DECADES = (-0.5, -0.25, 0.25, 0.5)

Params = Dict[str, jax.Array]


# ---------------------------------------------------------------------------
# L2-regularised multinomial logistic regression, full-batch L-BFGS in JAX.
# ---------------------------------------------------------------------------


def logistic_objective(params: Params, x: jax.Array, y: jax.Array, weights: jax.Array, l2) -> jax.Array:
    """``sum_i v_i CE(x_i W + b, y_i) / sum_i v_i + l2/2 ||W||^2`` (bias unpenalised).

    The 0/1 row weights ``v`` exclude rows without changing the array shape:
    the held-out rows during l2 selection and the padding rows that round
    ``n`` up to a bucket, so that one compilation serves many fits.
    """
    logits = x @ params["w"] + params["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(weights * ce) / jnp.sum(weights) + 0.5 * l2 * jnp.sum(jnp.square(params["w"]))


def zero_params(num_features: int, num_classes: int) -> Params:
    return {
        "w": jnp.zeros((num_features, num_classes), jnp.float32),
        "b": jnp.zeros((num_classes,), jnp.float32),
    }


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_logistic_regression(
    x: jax.Array,
    y: jax.Array,
    l2,
    init: Params,
    weights: Optional[jax.Array] = None,
    *,
    max_iter: int = 500,
    tol: float = 1e-5,
) -> Tuple[Params, jax.Array]:
    """Minimises :func:`logistic_objective` from ``init``; returns ``(params, iterations)``.

    ``weights`` (0/1 per row, default all ones) drops rows from the mean.

    Stops when ``||grad J||_2 < tol`` or after ``max_iter`` L-BFGS iterations.
    ``tol`` applies to the gradient of the *mean* loss, so it does not scale
    with ``n``; 1e-5 is near float32 resolution for the reductions involved.
    ``l2`` and ``tol`` are traced: one compilation serves the whole grid.
    """
    x = x.astype(jnp.float32)
    weights = jnp.ones(x.shape[:1], jnp.float32) if weights is None else weights.astype(jnp.float32)
    fun = functools.partial(logistic_objective, x=x, y=y, weights=weights, l2=l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def not_converged(carry):
        _, state = carry
        count = otu.tree_get(state, "count")
        grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params, state = jax.lax.while_loop(not_converged, step, (init, solver.init(init)))
    return params, otu.tree_get(state, "count")


# ---------------------------------------------------------------------------
# Metrics and splits (host side, NumPy: cheap next to the fits).
# ---------------------------------------------------------------------------


def predict_logits(params: Params, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) @ np.asarray(params["w"]) + np.asarray(params["b"])


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of rows whose label is among the ``k`` largest logits (k clipped to C)."""
    k = min(k, logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean((top == np.asarray(labels)[:, None]).any(axis=1)))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    return float(np.mean(log_norm - shifted[np.arange(len(labels)), labels]))


def standardize_stats(x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std; constant features get std 1 (left at zero after centring)."""
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-8, std, 1.0)
    return mean.astype(np.float32), std.astype(np.float32)


def bucket_size(n: int) -> int:
    """Smallest ``2^k`` or ``3 * 2^k`` that is >= ``n`` (at least 8): at most 1/3 padding.

    Fits on arrays of the same bucket share one XLA compilation, which costs
    more than the fit itself for small problems.
    """
    size = 8
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


def pad_to_bucket(x: np.ndarray, y: np.ndarray) -> Tuple[jax.Array, jax.Array, np.ndarray]:
    """``(x, y, weights)`` padded with zero rows of weight 0 to :func:`bucket_size`."""
    n = x.shape[0]
    size = bucket_size(n)
    x_pad = np.zeros((size, x.shape[1]), np.float32)
    x_pad[:n] = x
    y_pad = np.zeros((size,), np.int32)
    y_pad[:n] = y
    weights = (np.arange(size) < n).astype(np.float32)
    return jnp.asarray(x_pad), jnp.asarray(y_pad), weights


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices ``(fit, holdout)``: ``round(fraction * n_c)`` of each class held out.

    Every class keeps at least one example on each side, so each class needs
    at least 2 examples (a clear error otherwise).
    """
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < 2:
            raise ValueError(
                f"Class {c} has {len(idx)} training example(s); choosing l2 on a held-out split "
                "needs at least 2 per class. Pass a fixed l2 instead."
            )
        n_held = int(np.clip(round(fraction * len(idx)), 1, len(idx) - 1))
        held.append(idx[:n_held])
        fit.append(idx[n_held:])
    return np.sort(np.concatenate(fit)), np.sort(np.concatenate(held))


# ---------------------------------------------------------------------------
# The features protocol.
# ---------------------------------------------------------------------------


def select_l2(
    x: jax.Array,
    y: jax.Array,
    fit_weights: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    num_classes: int,
    l2_grid: Sequence[float],
    refine: bool,
    select_by: str,
    max_iter: int,
    tol: float,
) -> Tuple[float, Dict[float, Dict[str, float]], Params]:
    """Sweeps ``l2_grid`` (strong to weak, warm-started), then refines around the best.

    Fits use the rows of ``x`` with ``fit_weights == 1``; ``x_val`` is the held-out part.

    ``select_by='accuracy'``: among the grid points whose held-out top-1 is
    within one binomial standard error ``sqrt(a (1 - a) / n_val)`` of the best
    ``a`` (statistically tied, the "one-standard-error" idea of Hastie et al.,
    ESL sec. 7.10), the one with the lowest held-out cross-entropy.
    ``select_by='loss'``: the lowest held-out cross-entropy. Returns
    ``(best_l2, {l2: {'val_top1', 'val_loss'}}, params_at_best)``.
    """
    if select_by not in ("loss", "accuracy"):
        raise ValueError(f"select_by must be 'loss' or 'accuracy', got {select_by!r}.")
    scores: Dict[float, Dict[str, float]] = {}
    fitted: Dict[float, Params] = {}

    def sweep(grid, params):
        for l2 in sorted((float(v) for v in grid), reverse=True):
            if l2 in scores:
                continue
            params, _ = fit_logistic_regression(
                x, y, jnp.float32(l2), params, jnp.asarray(fit_weights), max_iter=max_iter, tol=tol
            )
            logits = predict_logits(params, x_val)
            scores[l2] = {"val_top1": topk_accuracy(logits, y_val, 1), "val_loss": mean_cross_entropy(logits, y_val)}
            fitted[l2] = params

    def best():
        candidates = list(scores)
        if select_by == "accuracy":
            top = max(s["val_top1"] for s in scores.values())
            stderr = math.sqrt(top * (1.0 - top) / len(y_val))
            candidates = [l2 for l2 in candidates if scores[l2]["val_top1"] >= top - stderr]
        return min(candidates, key=lambda l2: (scores[l2]["val_loss"], -l2))

    sweep(l2_grid, zero_params(x.shape[1], num_classes))
    if refine:
        center = best()
        sweep([center * 10.0**d for d in REFINE_DECADES], fitted[center])
    chosen = best()
    return chosen, scores, fitted[chosen]


def linear_probe_features(
    train_x,
    train_y,
    test_x,
    test_y,
    *,
    num_classes: int,
    l2_grid: Optional[Sequence[float]] = None,
    holdout_fraction: float = 0.2,
    seed: int = 0,
    l2: Optional[float] = None,
    refine: bool = True,
    select_by: str = "accuracy",
    max_iter: int = 500,
    tol: float = 1e-5,
) -> Dict[str, Any]:
    """CLIP-style linear probe on frozen features; returns a dict with

    ``top1``, ``top5`` (test), ``l2`` (chosen), ``val_top1`` and ``val_loss``
    (held-out, at the chosen l2; NaN when ``l2`` is given), ``sweep``
    (``{l2: {'val_top1', 'val_loss'}}``) and ``iterations`` (of the final fit).

    Features are standardised with the mean/std of the whole training split
    (label-free statistics; using the same transform for selection and the
    final fit lets the final fit warm-start from the selected solution).
    Selection (``select_by='accuracy'``, default) maximises held-out top-1 as
    CLIP does, but treats grid points within one binomial standard error of
    the best as tied and breaks the tie by held-out cross-entropy. Accuracy
    alone is a noisy, piecewise-constant criterion: on uninformative
    features every l2 has chance accuracy and the argmax is a coin flip,
    while the log-loss (a proper scoring rule) clearly prefers strong l2.
    ``select_by='loss'`` selects by cross-entropy alone (on 10-class
    Gaussian blobs it picked a 30x weaker l2 with 0.6 points lower top-1:
    calibration and accuracy optima differ). A fixed ``l2`` skips the selection.
    """
    train_x = np.asarray(train_x, np.float32)
    test_x = np.asarray(test_x, np.float32)
    train_y = np.asarray(train_y).astype(np.int32)
    test_y = np.asarray(test_y).astype(np.int32)
    if train_y.min() < 0 or max(train_y.max(), test_y.max()) >= num_classes:
        raise ValueError(f"Labels must lie in [0, {num_classes}).")

    mean, std = standardize_stats(train_x)
    train_z = (train_x - mean) / std
    test_z = (test_x - mean) / std
    # Selection fits and the final fit share one padded array (and one compile).
    x_all, y_all, weights = pad_to_bucket(train_z, train_y)

    sweep: Dict[float, Dict[str, float]] = {}
    if l2 is None:
        _, val_idx = stratified_holdout(train_y, holdout_fraction, seed)
        fit_weights = weights.copy()
        fit_weights[val_idx] = 0.0
        l2, sweep, init = select_l2(
            x_all, y_all, fit_weights, train_z[val_idx], train_y[val_idx],
            num_classes=num_classes, l2_grid=l2_grid or DEFAULT_L2_GRID, refine=refine,
            select_by=select_by, max_iter=max_iter, tol=tol,
        )
        val = sweep[l2]
    else:
        init = zero_params(train_z.shape[1], num_classes)
        val = {"val_top1": math.nan, "val_loss": math.nan}

    params, iterations = fit_logistic_regression(
        x_all, y_all, jnp.float32(l2), init, jnp.asarray(weights), max_iter=max_iter, tol=tol
    )
    logits = predict_logits(params, test_z)
    return {
        "top1": topk_accuracy(logits, test_y, 1),
        "top5": topk_accuracy(logits, test_y, 5),
        "l2": float(l2),
        "val_top1": val["val_top1"],
        "val_loss": val["val_loss"],
        "sweep": sweep,
        "iterations": int(iterations),
    }


# ---------------------------------------------------------------------------
# The augmented protocol.
# ---------------------------------------------------------------------------


def cosine_lr(base_lr: float, step: int, total_steps: int) -> float:
    """``base_lr * (1 + cos(pi * step / total_steps)) / 2`` (SimCLR B.5, no warm-up)."""
    return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def count_steps(train_batches_fn: Callable[[int], Iterable]) -> int:
    """Batches per epoch: ``len()`` if the iterable has one, else a counting pass over epoch 0."""
    epoch0 = train_batches_fn(0)
    if hasattr(epoch0, "__len__"):
        return len(epoch0)  # type: ignore[arg-type]
    return sum(1 for _ in epoch0)


def uint8_to_unit_float(images) -> jax.Array:
    """Default centre-crop preprocessing: uint8 [0, 255] to float32 [0, 1]; floats pass through."""
    images = jnp.asarray(images)
    if images.dtype == jnp.uint8:
        return images.astype(jnp.float32) / 255.0
    return images.astype(jnp.float32)


def make_head_train_step(encode_fn, augment_fn, optimizer):
    """Jitted step: augment -> frozen encode -> softmax-CE on the linear head -> SGD update.

    ``encode_fn(variables, images)``: the encoder's variables are an argument
    of the step, not constants of its program (see :mod:`clrjax.evaluation.features`).
    """

    @jax.jit
    def train_step(head, opt_state, variables, batch, key, lr):
        images = augment_fn(batch["image"], batch["index"], key)
        # The encoder is frozen: no gradient reaches its parameters (or is even computed).
        feats = jax.lax.stop_gradient(encode_fn(variables, images))
        feats = feats.reshape(feats.shape[0], -1).astype(jnp.float32)
        mask = batch["mask"].astype(jnp.float32)

        def loss_fn(head):
            logits = feats @ head["w"] + head["b"]
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
            return jnp.sum(ce * mask) / jnp.maximum(jnp.sum(mask), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(head)
        updates, opt_state = optimizer.update(grads, opt_state, head)
        # SGD: momentum is accumulated on the raw gradient, then scaled by the
        # step's learning rate (optax.sgd's order), so lr can follow a schedule.
        head = jax.tree.map(lambda p, u: p - lr * u, head, updates)
        return head, opt_state, loss

    return train_step


def linear_probe_augmented(
    encode_fn: Callable[..., jax.Array],
    train_batches_fn: Callable[[int], Iterable[Mapping[str, Any]]],
    test_batches: Iterable[Mapping[str, Any]],
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    augment_fn: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    seed: int,
    mesh: Optional[Mesh] = None,
    steps_per_epoch: Optional[int] = None,
    test_preprocess_fn: Callable[[jax.Array], jax.Array] = uint8_to_unit_float,
    progress: bool = False,
    variables: Any = None,
) -> Dict[str, float]:
    """SimCLR/BYOL linear evaluation; returns ``{'top1', 'top5', 'train_loss'}``.

    Args:
      encode_fn: frozen encoder, ``(variables, float images) -> features``, or
        ``float images -> features`` when ``variables`` is None.
      train_batches_fn: ``epoch -> iterable`` of dicts ``'image'`` uint8,
        ``'label'``, ``'index'`` (global example counter) and optionally
        ``'mask'`` (False rows do not contribute to the loss).
      test_batches: iterable of test batches (``'image'``, ``'label'``, ``'mask'``).
      lr: base learning rate (SimCLR: 0.1 * batch / 256), decayed by a cosine
        over ``epochs * steps_per_epoch`` steps.
      weight_decay: L2 added to the head weights' gradient (not the bias); 0 as SimCLR.
      augment_fn: ``(images_u8, index, key) -> float images``; ``key`` is
        ``fold_in(key(seed), epoch)`` so augmentations differ between epochs
        even if ``index`` restarts every epoch.
      steps_per_epoch: batches per epoch for the schedule; by default
        ``len(train_batches_fn(0))``, or a counting pass over epoch 0.
      test_preprocess_fn: ``images -> float images`` at the centre crop;
        the default (uint8 -> [0, 1]) must match ``augment_fn``'s output range.
      variables: the encoder's parameters, passed to the compiled step (e.g.
        replicated over ``mesh``).

    The head starts at zero (its loss is convex, so initialisation only
    matters for speed).
    """
    sharding = batch_sharding(mesh) if mesh is not None else None
    steps_per_epoch = steps_per_epoch or count_steps(train_batches_fn)
    total_steps = epochs * steps_per_epoch

    # Coupled weight decay as in SGD with L2 (SimCLR/BYOL use 0), then momentum.
    mask_fn = lambda head: {"w": True, "b": False}
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=mask_fn),
        optax.trace(decay=momentum, nesterov=nesterov),
    )
    if variables is None:
        images_only, encode_fn, variables = encode_fn, (lambda _, images: images_only(images)), {}
    train_step = make_head_train_step(encode_fn, augment_fn, optimizer)
    base_key = jax.random.key(seed)

    head = opt_state = None
    step = batch_size = 0
    epoch_losses = []
    # Steps are dispatched asynchronously; the line blocks on the latest loss only when it
    # is redrawn (~4 Hz), so its rate times finished steps and the first step (compilation)
    # only starts the clock. examples = steps x batch size.
    bar = batch_progress("linear_probe_augmented", total_steps, progress, unit="step")
    for epoch in range(epochs):
        key = jax.random.fold_in(base_key, epoch)
        # Device scalars, summed once per epoch: a float() per step would
        # block the host on every step and serialise input and compute.
        epoch_losses = []
        for batch in train_batches_fn(epoch):
            batch = {
                "image": batch["image"],
                "label": np.asarray(batch["label"]).astype(np.int32),
                "index": np.asarray(batch["index"]).astype(np.int32),
                "mask": np.asarray(batch.get("mask", np.ones(len(batch["label"]), bool))),
            }
            batch = jax.tree.map(lambda a: place_batch(a, sharding), batch)
            if head is None:
                feature_shape = jax.eval_shape(lambda im: encode_fn(variables, augment_fn(im, batch["index"], key)),
                                               batch["image"])
                num_features = math.prod(feature_shape.shape[1:])
                head = zero_params(num_features, num_classes)
                opt_state = optimizer.init(head)
                if mesh is not None:  # placed as the step returns them: the step compiles once
                    head, opt_state = jax.device_put((head, opt_state), NamedSharding(mesh, PartitionSpec()))
            lr_t = jnp.float32(cosine_lr(lr, step, total_steps))
            head, opt_state, loss = train_step(head, opt_state, variables, batch, key, lr_t)
            epoch_losses.append(loss)
            step += 1
            batch_size = len(batch["label"])
            if bar.due():
                jax.block_until_ready(loss)
                bar.update(step, {}, images_per_step=batch_size, examples=step * batch_size)
    if bar.enabled:
        jax.block_until_ready(head)
    bar.close(step, {}, images_per_step=batch_size, examples=step * batch_size)
    if head is None:
        raise ValueError("linear_probe_augmented got no training batches.")

    test_encode = lambda params, images: encode_fn(params, test_preprocess_fn(images))
    test_feats, test_labels = extract_features(test_encode, test_batches, mesh=mesh, progress=progress,
                                               variables=variables)
    logits = predict_logits(head, test_feats)
    return {
        "top1": topk_accuracy(logits, test_labels, 1),
        "top5": topk_accuracy(logits, test_labels, 5),
        "train_loss": float(jnp.mean(jnp.stack(epoch_losses))),
    }
