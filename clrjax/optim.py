"""Optimizers, learning-rate schedules, large-batch LR scaling and weight-decay masks.

Everything here is a pure function that returns optax objects, so the train
step only sees one `optax.GradientTransformation` and one schedule function.

Sources:
  * LARS: You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
    Networks" (arXiv:1708.03888), as used by SimCLR (Chen et al. 2020,
    arXiv:2002.05709), BYOL (Grill et al. 2020) and Barlow Twins (Zbontar et al.
    2021, arXiv:2103.03230).
  * Linear LR scaling and warmup: Goyal et al. 2017, "Accurate, Large Minibatch
    SGD" (arXiv:1706.02677).
  * Square-root LR scaling: SimCLR appendix B.1.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

Schedule = Callable[[Any], jax.Array]

LR_SCALING_RULES = ("none", "linear", "sqrt")
OPTIMIZER_NAMES = ("lars", "sgd", "adamw")


# ---------------------------------------------------------------------------
# Learning-rate scaling with the global batch size
# ---------------------------------------------------------------------------
def scaled_learning_rate(
    base_lr: float, global_batch: int, rule: str, base_batch: int = 256
) -> float:
    """Peak learning rate for a global batch of `global_batch` examples.

    Rules (B = global_batch):
      * ``'none'``:   lr = base_lr.
      * ``'linear'``: lr = base_lr * B / base_batch (Goyal et al. 2017; SimCLR
        uses LR = 0.3 x BatchSize / 256 with LARS).
      * ``'sqrt'``:   lr = base_lr * sqrt(B), exactly SimCLR appendix B.1
        (LR = 0.075 x sqrt(BatchSize), which it recommends for small batches
        and long training). This rule has *no* base batch: `base_batch` is
        ignored. The other common square-root form, relative to a base batch,
        lr = base_lr' * sqrt(B / base_batch) (Krizhevsky 2014), is the same
        rule with base_lr = base_lr' / sqrt(base_batch).

    Raises:
      ValueError: unknown rule or non-positive batch sizes / negative base_lr.
    """
    if rule not in LR_SCALING_RULES:
        raise ValueError(
            f"lr_scaling={rule!r} is unknown; use one of {LR_SCALING_RULES}."
        )
    if global_batch <= 0:
        raise ValueError(f"global_batch must be positive, got {global_batch}.")
    if base_batch <= 0:
        raise ValueError(f"base_batch must be positive, got {base_batch}; use e.g. 256.")
    if base_lr < 0:
        raise ValueError(f"base learning rate must be >= 0, got {base_lr}.")
    if rule == "linear":
        return base_lr * global_batch / base_batch
    if rule == "sqrt":
        return base_lr * math.sqrt(global_batch)
    return float(base_lr)


# ---------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------
def warmup_cosine_schedule(
    peak_lr: float, total_steps: int, warmup_steps: int, end_lr: float = 0.0
) -> Schedule:
    """Linear warmup from 0 to `peak_lr`, then cosine decay to `end_lr`.

    With t the number of updates already applied (optax's `count`), W the
    warmup steps and T the total steps:

      lr(t) = peak_lr * t / W                                  for t < W
      lr(t) = end_lr + (peak_lr - end_lr) * (1 + cos(pi * p)) / 2,
              p = clip((t - W) / (T - W), 0, 1)                for t >= W

    This is `optax.warmup_cosine_decay_schedule(0, peak_lr, W, T, end_lr)`
    (decay length T includes the warmup), SimCLR's schedule, with the boundary
    cases defined: W = 0 starts at the peak; W = T (no decay phase) gives
    end_lr from t = T on. For t >= T the value stays at end_lr.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}.")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}; "
            "shorten the warmup or train longer."
        )
    if peak_lr < 0 or end_lr < 0:
        raise ValueError(f"learning rates must be >= 0, got peak_lr={peak_lr}, end_lr={end_lr}.")
    decay_steps = total_steps - warmup_steps

    def schedule(step):
        t = jnp.asarray(step, jnp.float32)
        # max(.., 1) only avoids a 0/0 in the branch that jnp.where discards.
        warm = peak_lr * t / max(warmup_steps, 1)
        progress = jnp.clip((t - warmup_steps) / max(decay_steps, 1), 0.0, 1.0)
        if decay_steps == 0:
            progress = jnp.ones_like(t)
        cosine = end_lr + (peak_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(t < warmup_steps, warm, cosine)

    return schedule


def current_learning_rate(schedule_fn: Schedule, step) -> jax.Array:
    """Learning rate the optimizer applies at update number `step` (for logging).

    `step` is the number of updates already applied (the optimizer's count), so
    `current_learning_rate(schedule, state.step)` is the rate of the next
    update. Works under jit; call `float()` on the result to log it.
    """
    return jnp.asarray(schedule_fn(step), jnp.float32)


# ---------------------------------------------------------------------------
# Weight-decay mask
# ---------------------------------------------------------------------------
# A module is a normalisation layer if its name contains "norm" (BatchNorm,
# LayerNorm, GroupNorm, RMSNorm, encoder_norm...) or has a "bn"/"ln" token
# ("bn1", "proj_ln", "ln_2"). Tokens, not substrings, so that e.g. "kiln" is
# not a LayerNorm.
_NORM_MODULE = re.compile(r"norm|(?:^|_)(?:bn|ln)\d*(?:_|$)", re.IGNORECASE)
_NORM_PARAM_NAMES = ("scale", "bias")


def _path_names(path) -> list[str]:
    names = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                names.append(str(getattr(entry, attr)))
                break
        else:
            names.append(str(entry))
    return names


def _is_decayed(path, leaf) -> bool:
    # Biases, norm scales/offsets, scalars. `.shape` rather than jnp.ndim so
    # abstract params (jax.ShapeDtypeStruct) work too; Python scalars have none.
    if len(getattr(leaf, "shape", ())) <= 1:
        return False
    *modules, leaf_name = _path_names(path) or [""]
    in_norm_module = any(_NORM_MODULE.search(m) for m in modules)
    return not (in_norm_module and leaf_name in _NORM_PARAM_NAMES)


def weight_decay_mask(params):
    """Pytree of bools like `params`: True where weight decay (and LARS) applies.

    Rule (BYOL / Barlow Twins official code; SimCLR excludes BN and biases):
      * False for every leaf with ndim <= 1: biases, BatchNorm/LayerNorm
        `scale` and `bias`, scalars (e.g. a learnable temperature).
      * False for leaves named `scale` or `bias` under any module whose name
        contains "norm" (any case) or a "bn"/"ln" token ("bn1", "proj_ln").
      * True otherwise: conv/dense kernels, embeddings, position embeddings,
        class tokens.
    Use it as the `mask` of `lars`, `optax.adamw`, `optax.masked`.
    """
    return jax.tree_util.tree_map_with_path(_is_decayed, params)


# ---------------------------------------------------------------------------
# LARS
# ---------------------------------------------------------------------------
class TrustRatioState(NamedTuple):
    """`scale_by_layerwise_trust_ratio` is stateless."""


def _trust_ratio(param, update, trust_coefficient, eps):
    # Norms in at least float32 so bfloat16 parameters do not under/overflow.
    dtype = jnp.promote_types(param.dtype, jnp.float32)
    w_norm = jnp.sqrt(jnp.sum(jnp.square(param.astype(dtype))))
    g_norm = jnp.sqrt(jnp.sum(jnp.square(update.astype(dtype))))
    ratio = trust_coefficient * w_norm / (g_norm + eps)
    # A zero weight (fresh zero-init layer) or a zero update would give 0 or
    # inf: fall back to the plain update, as the SimCLR/BYOL/BT code does.
    return jnp.where((w_norm > 0) & (g_norm > 0), ratio, 1.0)


def scale_by_layerwise_trust_ratio(
    trust_coefficient: float = 0.001, eps: float = 0.0
) -> optax.GradientTransformation:
    """Scales each leaf's update u by eta * ||w|| / (||u|| + eps) (You et al. 2017).

    The ratio is 1 where ||w|| = 0 or ||u|| = 0. Norms are Frobenius norms over
    the whole leaf (one "layer" per parameter array).
    """

    def init_fn(params):
        del params
        return TrustRatioState()

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("LARS needs params: call optimizer.update(grads, state, params).")

        def scale(update, param):
            ratio = _trust_ratio(param, update, trust_coefficient, eps)
            return (update * ratio).astype(update.dtype)

        return jax.tree.map(scale, updates, params), state

    return optax.GradientTransformation(init_fn, update_fn)


def lars(
    learning_rate,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    trust_coefficient: float = 0.001,
    eps: float = 0.0,
    mask=None,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """LARS as in SimCLR / BYOL / Barlow Twins.

    Per parameter array w with gradient g, where `mask` is True:
      g  <- g + weight_decay * w                          (L2 in the gradient)
      g  <- g * r,  r = eta * ||w|| / (||g|| + eps), r = 1 if ||w|| or ||g|| is 0
    for every parameter:
      v  <- momentum * v + g
      u  <- v                      (nesterov: u <- momentum * v + g)
      w  <- w - lr(t) * u
    Where `mask` is False (biases, norm parameters; see `weight_decay_mask`) the
    gradient gets neither weight decay nor trust-ratio scaling, only momentum
    (BYOL's and Barlow Twins' `exclude_bias_and_norm`).

    The learning rate multiplies the momentum buffer (Barlow Twins' PyTorch
    LARS). SimCLR's and BYOL's TF/JAX code put lr(t) inside the buffer
    (v <- m v + lr(t) g); the two are identical for a constant learning rate
    and differ only by lr(t)/lr(t-1) ratios under a schedule.

    Args:
      learning_rate: float or schedule `step -> lr`.
      weight_decay: L2 coefficient added to the gradient (SimCLR 1e-6,
        BYOL 1.5e-6, Barlow Twins 1.5e-6).
      momentum: heavy-ball momentum (0.9 in all three papers).
      trust_coefficient: eta (1e-3 in all three papers).
      eps: added to ||g|| in the trust ratio's denominator.
      mask: pytree of bools or a callable `params -> pytree of bools`; None
        applies weight decay and trust ratio to every parameter.
      nesterov: Nesterov momentum.
    """
    if mask is None:
        mask = lambda params: jax.tree.map(lambda _: True, params)  # noqa: E731
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), mask),
        optax.masked(scale_by_layerwise_trust_ratio(trust_coefficient, eps), mask),
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )


def sgd_l2(learning_rate, weight_decay: float = 0.0, momentum: float = 0.9,
           mask=None, nesterov: bool = False) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the (masked) gradient.

      g <- g + weight_decay * w (where mask), v <- momentum v + g, w <- w - lr(t) v.
    """
    if mask is None:
        mask = lambda params: jax.tree.map(lambda _: True, params)  # noqa: E731
    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), mask),
        optax.trace(decay=momentum, nesterov=nesterov),
        optax.scale_by_learning_rate(learning_rate),
    )


# ---------------------------------------------------------------------------
# Config -> optimizer
# ---------------------------------------------------------------------------
# Every field is required: the defaults live in clrjax.config.base_config().optimizer only.
_FIELDS = ("name", "lr", "lr_scaling", "base_batch", "weight_decay", "momentum", "nesterov",
           "trust_coefficient", "b1", "b2", "warmup_epochs", "end_lr", "grad_clip_norm")
# Optional fields and their defaults (added after the required ones; older configs lack them).
_OPTIONAL_FIELDS = {"freeze": ()}


def _as_dict(opt_cfg) -> dict:
    if hasattr(opt_cfg, "to_dict"):  # ml_collections.ConfigDict
        return dict(opt_cfg.to_dict())
    if isinstance(opt_cfg, Mapping):
        return dict(opt_cfg)
    raise ValueError(f"opt_cfg must be a mapping or ConfigDict, got {type(opt_cfg).__name__}.")


def _check_in_range(cfg, field, lo, hi, hint, lo_open=False, hi_open=False):
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"opt_cfg.{field} must be a number, got {value!r}; {hint}.")
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if below or above:
        lo_b = "(" if lo_open else "["
        hi_b = ")" if hi_open else "]"
        raise ValueError(
            f"opt_cfg.{field} must be in {lo_b}{lo}, {hi}{hi_b}, got {value!r}; {hint}."
        )


def _validated(opt_cfg) -> dict:
    cfg = _as_dict(opt_cfg)
    unknown = sorted(set(cfg) - set(_FIELDS) - set(_OPTIONAL_FIELDS))
    if unknown:
        raise ValueError(
            f"opt_cfg has unknown field(s) {unknown}; remove them (known fields: {sorted(_FIELDS)})."
        )
    for field in _FIELDS:
        if field not in cfg:
            raise ValueError(f"opt_cfg.{field} is missing; set it "
                             "(every field is required, as in clrjax.config.base_config().optimizer).")
    for field, default in _OPTIONAL_FIELDS.items():
        cfg.setdefault(field, default)
    cfg["freeze"] = _checked_paths(cfg["freeze"])
    if cfg["name"] not in OPTIMIZER_NAMES:
        raise ValueError(f"opt_cfg.name={cfg['name']!r} is unknown; use one of {OPTIMIZER_NAMES}.")
    if cfg["lr_scaling"] not in LR_SCALING_RULES:
        raise ValueError(
            f"opt_cfg.lr_scaling={cfg['lr_scaling']!r} is unknown; use one of {LR_SCALING_RULES}."
        )
    inf = float("inf")
    _check_in_range(cfg, "lr", 0.0, inf, "set a positive base learning rate", lo_open=True)
    _check_in_range(cfg, "base_batch", 0, inf, "use e.g. 256", lo_open=True)
    _check_in_range(cfg, "weight_decay", 0.0, inf, "use 0 to disable it")
    _check_in_range(cfg, "momentum", 0.0, 1.0, "use e.g. 0.9", hi_open=True)
    _check_in_range(cfg, "trust_coefficient", 0.0, inf, "use e.g. 0.001", lo_open=True)
    _check_in_range(cfg, "b1", 0.0, 1.0, "use e.g. 0.9", hi_open=True)
    _check_in_range(cfg, "b2", 0.0, 1.0, "use e.g. 0.999", hi_open=True)
    _check_in_range(cfg, "warmup_epochs", 0.0, inf, "use 0 for no warmup")
    _check_in_range(cfg, "end_lr", 0.0, inf, "use 0 to decay to zero")
    if cfg["grad_clip_norm"] is not None:
        _check_in_range(cfg, "grad_clip_norm", 0.0, inf, "use 0 or None to disable clipping")
    return cfg


def build_optimizer(
    opt_cfg, *, global_batch: int, total_steps: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Schedule]:
    """Optimizer and its learning-rate schedule from a config mapping.

    Fields of `opt_cfg` (mapping or ml_collections.ConfigDict; every one is
    required and unknown fields are an error; `clrjax.config.base_config()`
    holds their defaults):
      name               'lars' | 'sgd' | 'adamw'
      lr                 base learning rate, before scaling
      lr_scaling         'none' | 'linear' | 'sqrt' (see `scaled_learning_rate`)
      base_batch         batch of the 'linear' rule
      weight_decay       L2 in the gradient for lars/sgd, decoupled for adamw;
                         masked by `weight_decay_mask` in all three
      momentum, nesterov lars/sgd momentum
      trust_coefficient  LARS eta
      b1, b2             AdamW moment decays
      warmup_epochs      linear warmup length in epochs (float), converted
                         with steps_per_epoch and rounded to whole steps
      end_lr             absolute final learning rate of the cosine decay
      grad_clip_norm     clip gradients by global norm first; 0/None = off
      freeze             optional, default (): parameter paths never updated
                         (see `freeze`), e.g. ('encoder/patch_embed',)

    Returns:
      (optimizer, schedule): `schedule(step)` is the learning rate of update
      number `step`; log it with `current_learning_rate`.
    """
    cfg = _validated(opt_cfg)
    for name, value in (("global_batch", global_batch), ("total_steps", total_steps),
                        ("steps_per_epoch", steps_per_epoch)):
        if int(value) != value or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    warmup_steps = int(round(cfg["warmup_epochs"] * steps_per_epoch))
    if warmup_steps > total_steps:
        longest = math.floor(total_steps / steps_per_epoch * 1e4) / 1e4  # 4 decimals, rounded down
        raise ValueError(
            f"opt_cfg.warmup_epochs={cfg['warmup_epochs']} is {warmup_steps} steps, longer than "
            f"the {total_steps} training steps ({steps_per_epoch} steps per epoch); pass "
            f"--opt_cfg.warmup_epochs={longest:g} or less (0: no warmup), or train longer "
            "(--config.num_steps, or --config.num_epochs when num_steps is 0)."
        )
    peak_lr = scaled_learning_rate(cfg["lr"], global_batch, cfg["lr_scaling"], cfg["base_batch"])
    schedule = warmup_cosine_schedule(peak_lr, total_steps, warmup_steps, cfg["end_lr"])

    if cfg["name"] == "lars":
        optimizer = lars(schedule, weight_decay=cfg["weight_decay"], momentum=cfg["momentum"],
                         trust_coefficient=cfg["trust_coefficient"], mask=weight_decay_mask,
                         nesterov=cfg["nesterov"])
    elif cfg["name"] == "sgd":
        optimizer = sgd_l2(schedule, weight_decay=cfg["weight_decay"], momentum=cfg["momentum"],
                           mask=weight_decay_mask, nesterov=cfg["nesterov"])
    else:
        optimizer = optax.adamw(schedule, b1=cfg["b1"], b2=cfg["b2"],
                                weight_decay=cfg["weight_decay"], mask=weight_decay_mask)
    if cfg["grad_clip_norm"]:
        optimizer = optax.chain(optax.clip_by_global_norm(cfg["grad_clip_norm"]), optimizer)
    if cfg["freeze"]:
        # Outermost, so that clipping and weight decay never see the frozen leaves.
        optimizer = freeze(optimizer, cfg["freeze"])
    return optimizer, schedule


# ---------------------------------------------------------------------------
# Frozen parameters
# ---------------------------------------------------------------------------
def _checked_paths(paths) -> tuple:
    if isinstance(paths, str) or not isinstance(paths, (tuple, list)):
        raise ValueError(f"opt_cfg.freeze must be a tuple of parameter paths such as "
                         f"('encoder/patch_embed',), got {paths!r}.")
    for path in paths:
        if not isinstance(path, str) or not path.strip("/"):
            raise ValueError(f"opt_cfg.freeze holds {path!r}; give '/'-separated parameter paths "
                             "such as 'encoder/patch_embed'.")
    return tuple(path.strip("/") for path in paths)


def path_is_frozen(path, frozen) -> bool:
    """Whether the leaf at `path` (a jax key path) lies under one of the `frozen` paths.

    A frozen path names a module or a leaf by its '/'-joined names from the
    root of the parameter tree: 'encoder/patch_embed' covers
    'encoder/patch_embed/kernel' and '.../bias', not 'encoder/patch_embed_2'.
    """
    name = "/".join(_path_names(path))
    return any(name == p or name.startswith(p + "/") for p in frozen)


def frozen_leaf_paths(params, frozen) -> list:
    """'/'-joined paths of the leaves of `params` that `frozen` covers."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return ["/".join(_path_names(path)) for path, _ in flat if path_is_frozen(path, frozen)]


def freeze(tx: optax.GradientTransformation, frozen) -> optax.GradientTransformation:
    """`tx` on every parameter except those under the `frozen` paths (see `path_is_frozen`).

    Frozen leaves get a zero update (`optax.set_to_zero`), so they stay
    bit-identical to their initial values, and `tx` never sees them: no
    optimizer state, no weight decay, no share in gradient clipping. This is
    PyTorch's ``requires_grad = False`` on a parameter that the optimizer then
    skips, e.g. MoCo v3's frozen random patch projection (Chen, Xie & He 2021,
    sec. 4.2; official ``vits.py``, ``stop_grad_conv1``: the patch
    embedding's weight and bias).
    """
    frozen = _checked_paths(frozen)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if path_is_frozen(path, frozen) else "train", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
