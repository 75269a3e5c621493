"""Pretraining: the train state, one jitted step over the device mesh, the loop.

The trainer is generic: what runs in a step (networks, views, loss, method
state, after-update hook) comes from the method (``clrjax.methods``; the
interface is documented in ``clrjax/methods/base.py``), and this file names
no method. One step (docs/DESIGN.md):
  * the method's views of each example (``method.make_views``: by default
    ``method.num_views`` augmented views per image), on device; each example's
    randomness is ``fold_in(fold_in(rng, step), global_example_index)`` so
    nothing depends on how many devices or processes share the batch;
  * the method's networks run under plain ``jax.jit`` on the global,
    batch-sharded array, so BatchNorm statistics are global-batch statistics;
  * the method's loss runs per shard under ``jax.shard_map`` with named-axis
    collectives and returns the global-batch loss, metrics and new state;
  * the method's ``after_update`` hook sees the new parameters (e.g. an EMA);
  * an online linear probe trains on ``stop_gradient`` features with its own
    optimizer (SimCLR appendix B.6, BYOL appendix C.1);
  * a non-finite loss or gradient never reaches the state: the update is
    dropped inside the step and the host decides to stop or skip.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import time
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import PartitionSpec as P

from clrjax import checkpoint as ckpt_lib
from clrjax import config as config_lib
from clrjax import gradient_cache
from clrjax import methods, metrics as metrics_lib, optim, parallel, profiling, state_sharding
from clrjax import storage, workdir_lock
from clrjax.data import counters as data_counters, datasets, pipeline, sources, tokenizers


class NonFiniteError(RuntimeError):
    """Training stopped because a loss or gradient was NaN/Inf."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # completed optimisation steps
    params: Any                # the method's networks, e.g. {'encoder', 'projector', 'probe'}
    batch_stats: Any           # BatchNorm running statistics
    opt_state: Any             # optax state of each parameter group ('ssl', 'probe')
    method_state: Any          # the method's own state (e.g. TiCo's covariance); {} when stateless
    rng: jax.Array             # base key; step keys are fold_in(rng, step)
    skips: jax.Array           # consecutive dropped (non-finite) updates
    total_skips: jax.Array     # all dropped updates of the run


# --------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Experiment:
    """Everything built from a config before the first step."""
    config: Any
    model: Any
    method: Any
    tx: optax.GradientTransformation
    schedule: Callable
    mesh: Any
    train_source: Any
    steps_per_epoch: int
    total_steps: int
    image_shape: tuple


def total_training_steps(config, num_examples: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps); the remainder of each epoch is dropped."""
    steps_per_epoch = num_examples // config.batch_size
    if steps_per_epoch == 0:
        raise config_lib.ConfigError(
            f"config.batch_size is {config.batch_size} but the training split has only "
            f"{num_examples} examples; use a batch size of at most {num_examples}.")
    if config.num_steps > 0:
        return steps_per_epoch, int(config.num_steps)
    total = max(1, int(round(config.num_epochs * steps_per_epoch)))
    if total > config_lib.MAX_COUNT:
        raise config_lib.ConfigError(
            f"config.num_epochs is {config.num_epochs}, which is {total} steps of {steps_per_epoch} per epoch, more "
            f"than the int32 step counter holds; set --config.num_epochs to at most "
            f"{config_lib.MAX_COUNT // steps_per_epoch}.")
    return steps_per_epoch, total


def build_optimizer(config, steps_per_epoch: int, total_steps: int, method=None):
    """One optax transform over the method's parameter groups (``method.param_labels``).

    'ssl': the configured optimizer and schedule; 'probe': Adam(W) of the
    online probe; 'frozen': no update and no optimizer state.
    """
    method = methods.get(config.method) if method is None else method
    try:
        ssl_tx, schedule = optim.build_optimizer(
            config.optimizer.to_dict(), global_batch=config.batch_size,
            total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    except ValueError as err:
        raise config_lib.ConfigError(str(err).replace("opt_cfg.", "config.optimizer.")) from None
    probe_tx = optax.adamw(config.probe.lr, weight_decay=config.probe.weight_decay)
    groups = {"ssl": ssl_tx, "probe": probe_tx, "frozen": optax.set_to_zero()}
    return optax.multi_transform(groups, method.param_labels), schedule


def build_experiment(config, mesh=None, num_processes: Optional[int] = None) -> Experiment:
    """Validates the config, loads the training split and builds model and optimizer."""
    mesh = parallel.make_mesh() if mesh is None else mesh
    num_processes = jax.process_count() if num_processes is None else num_processes
    config_lib.validate_config(config, num_devices=mesh.size, num_processes=num_processes)
    train_source = sources.load_source(config.dataset.to_dict(), config.dataset.train_split)
    if config.eval.final or any(e["every_steps"] > 0 for e in config.evals.values()):
        # Opened now so that a split the dataset lacks, or its missing files, fail before training.
        test_source = sources.load_source(config.dataset.to_dict(), config.dataset.test_split)
        _check_periodic_data(config, test_source)
    image_shape = tuple(train_source.image_shape)
    _check_channels(config, image_shape)
    steps_per_epoch, total_steps = total_training_steps(config, len(train_source))
    config_lib.check_profile_steps(config, total_steps)
    method = methods.get(config.method)
    if hasattr(method, "for_config"):  # a method whose parameter groups depend on the config (LiT's lock)
        method = method.for_config(config)
    if getattr(method, "uses_text", False):  # image-text methods: the data pipeline tokenizes the captions
        train_source.tokenizer = tokenizers.get_tokenizer(config.text.to_dict())
    model = method.build_model(config, train_source.num_classes)
    tx, schedule = build_optimizer(config, steps_per_epoch, total_steps, method)
    return Experiment(config=config, model=model, method=method, tx=tx,
                      schedule=schedule, mesh=mesh, train_source=train_source,
                      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                      image_shape=image_shape)


def _check_channels(config, image_shape) -> None:
    channels = image_shape[-1]
    for field in ("mean", "std"):
        n = len(config.augment[field])
        if not (n == channels or n == 1 or (channels == 1 and n > 0)):
            raise config_lib.ConfigError(
                f"config.augment.{field} has {n} values but the images have {channels} channels; "
                "give one value per channel, or one value for all.")


def model_input_shape(exp: Experiment) -> tuple:
    crop = exp.config.augment.crop_size
    return (crop, crop, exp.image_shape[-1])


def init_train_state(exp: Experiment) -> TrainState:
    """Initial state, laid out on the mesh by ``config.sharding`` (same on every process: same seed)."""
    init_fn = _init_fn(exp)
    return jax.jit(init_fn, out_shardings=_shardings_of(exp, jax.eval_shape(init_fn)))()


def train_state_shardings(exp: Experiment):
    """The NamedSharding of every leaf of the train state: replicated, or FSDP (clrjax/state_sharding.py)."""
    return _shardings_of(exp, jax.eval_shape(_init_fn(exp)))


def _shardings_of(exp: Experiment, abstract_state):
    return state_sharding.config_shardings(abstract_state, exp.mesh, exp.config.sharding)


def _init_fn(exp: Experiment):
    config = exp.config
    init_key, aug_key = jax.random.split(jax.random.PRNGKey(config.seed))

    def init_fn():
        dummy = jnp.zeros((2,) + model_input_shape(exp), jnp.float32)
        variables = exp.model.init(init_key, dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params,
            batch_stats=variables.get("batch_stats", {}), opt_state=exp.tx.init(params),
            method_state=exp.method.init_state(config, variables),
            rng=aug_key, skips=jnp.zeros((), jnp.int32), total_skips=jnp.zeros((), jnp.int32))

    return init_fn


# --------------------------------------------------------------------------- the step


def _probe_metrics(logits, labels):
    """Cross-entropy and accuracy of the online probe on every view: logits [B, V, C]."""
    per_view_labels = jnp.broadcast_to(labels[:, None], logits.shape[:2])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, per_view_labels).mean()
    acc = (jnp.argmax(logits, -1) == per_view_labels).mean()
    return loss, acc


def make_grad_fn(exp: Experiment):
    """Returns ``grads_of(state, batch) -> (grads, batch_stats, aux)``: one step's gradients.

    ``aux`` is ``(method_state, loss_metrics, ssl_loss, probe_loss, probe_acc)``.
    With ``config.micro_batch_size`` the gradient is computed by gradient
    caching (``clrjax/gradient_cache.py``), in ``batch_size / micro_batch_size``
    micro-batches; the loss is the same global-batch loss either way.
    """
    config = exp.config
    method, model = exp.method, exp.model
    loss_kwargs = config_lib.loss_kwargs(config)
    aug_cfg = config.augment.to_dict()

    def per_shard_loss(loss_inputs, batch, method_state):
        return method.loss(loss_inputs, batch, method_state, axis_name=parallel.DATA_AXIS, **loss_kwargs)

    rows = P(parallel.DATA_AXIS)
    sharded_loss = jax.shard_map(per_shard_loss, mesh=exp.mesh, in_specs=(rows, rows, P()),
                                 out_specs=(P(), P(), P()))

    def forward(params, state, examples, key):
        """The method's networks on its views of these examples -> (outputs, batch_stats)."""
        views = method.make_views(examples, key, aug_cfg)
        variables = {"params": params, "batch_stats": state.batch_stats}
        return method.forward(model, variables, views, state.method_state, train=True)

    def head(outputs, state, batch):
        """Loss of the whole batch from the networks' outputs: the method's loss + the online probe's."""
        loss_inputs = {k: outputs[k] for k in method.loss_inputs}
        loss_batch = {"label": batch["label"], "index": batch["index"]}
        ssl_loss, method_state, loss_metrics = sharded_loss(loss_inputs, loss_batch, state.method_state)
        probe_loss, probe_acc = _probe_metrics(outputs["probe_logits"], batch["label"])
        return ssl_loss + probe_loss, (method_state, loss_metrics, ssl_loss, probe_loss, probe_acc)

    def full_batch_grads(state, batch, key):
        def objective(params):
            outputs, batch_stats = forward(params, state, batch, key)
            total, aux = head(outputs, state, batch)
            return total, (batch_stats, aux)

        (_, (batch_stats, aux)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        return grads, batch_stats, aux

    def cached_grads(state, batch, key):
        # Augmentation runs inside each micro-step: per-example keys make passes 1 and 3 see the same views.
        def micro_forward(params, micro):
            return forward(params, state, micro, key)

        (_, aux), grads, stats = gradient_cache.value_and_grad(
            micro_forward, lambda outputs: head(outputs, state, batch), state.params, batch,
            num_micro, mesh=exp.mesh)
        # Every micro-batch updated the same running averages: their mean is one update with the
        # mean of the micro-batch statistics (see clrjax/gradient_cache.py on BatchNorm).
        return grads, jax.tree.map(lambda s: jnp.mean(s, axis=0), stats), aux

    num_micro = config.batch_size // config.micro_batch_size if config.micro_batch_size else 1
    compute_grads = cached_grads if config.micro_batch_size else full_batch_grads

    def grads_of(state: TrainState, batch):
        return compute_grads(state, batch, jax.random.fold_in(state.rng, state.step))

    return grads_of


# Step metric holding one flag per :func:`checked_leaves` leaf (not a scalar: never logged).
LEAVES_FINITE = "leaves_finite"


def checked_leaves(state: TrainState) -> list:
    """(dotted name, array) of every floating-point leaf of the state that a bad update could
    make non-finite: parameters, BatchNorm statistics, optimizer and method state."""
    tree = {"params": state.params, "batch_stats": state.batch_stats,
            "opt_state": state.opt_state, "method_state": state.method_state}
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(path, simple=True, separator="."), x)
            for path, x in flat if jnp.issubdtype(x.dtype, jnp.inexact)]


def make_train_step(exp: Experiment, *, jit: bool = True):
    """Returns ``step(state, batch) -> (state, metrics)`` jitted over the mesh.

    ``batch`` holds 'image' uint8 [B,H,W,C], 'label' int32 [B] and 'index'
    int32 [B] (global example counter), and 'text' int32 [B, L] for image-text data
    (:data:`MODEL_FIELDS`), sharded over the batch axis.
    """
    method, tx = exp.method, exp.tx
    grads_of = make_grad_fn(exp)
    state_shardings = train_state_shardings(exp)
    fsdp = exp.config.sharding.mode == "fsdp"

    def step_fn(state: TrainState, batch):
        grads, batch_stats, aux = grads_of(state, batch)
        if fsdp:  # each device keeps its shard of the gradient: a reduce-scatter, not an all-reduce
            grads = jax.lax.with_sharding_constraint(grads, state_shardings.params)
        method_state, loss_metrics, ssl_loss, probe_loss, probe_acc = aux
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(ssl_loss) & jnp.isfinite(probe_loss) & jnp.isfinite(grad_norm)
        params = optax.apply_updates(state.params, updates)
        method_state = method.after_update(method_state, params=params, batch_stats=batch_stats,
                                           step=state.step + 1, total_steps=exp.total_steps)
        updated = state.replace(step=state.step + 1, params=params,
                                batch_stats=batch_stats, opt_state=opt_state,
                                method_state=method_state, skips=jnp.zeros_like(state.skips))
        dropped = state.replace(step=state.step + 1, skips=state.skips + 1,
                                total_skips=state.total_skips + 1)
        # A finite loss can still produce an Inf BatchNorm variance or optimizer moment: every
        # leaf of the new state must be finite before it replaces the old one (or is saved).
        leaves_finite = jnp.stack([jnp.all(jnp.isfinite(x)) for _, x in checked_leaves(updated)])
        finite = finite & jnp.all(leaves_finite)
        new_state = jax.tree.map(lambda u, d: jnp.where(finite, u, d), updated, dropped)
        step_metrics = dict(loss_metrics, loss=ssl_loss, probe_loss=probe_loss, probe_acc=probe_acc,
                            grad_norm=grad_norm, finite=finite, lr=exp.schedule(state.step),
                            skipped_updates=new_state.total_skips, consecutive_skips=new_state.skips,
                            **{LEAVES_FINITE: leaves_finite})
        return new_state, step_metrics

    if not jit:
        return step_fn
    return jax.jit(step_fn,
                   in_shardings=(state_shardings, parallel.batch_sharding(exp.mesh)),
                   out_shardings=(state_shardings, parallel.replicated(exp.mesh)),
                   donate_argnums=0)


# --------------------------------------------------------------------------- run identity


# Fields that change how a run is observed or saved but not what it computes:
# they may differ between a run and its resumption without --allow_config_change.
# The state's layout (sharding) changes only the float32 summation order.
OPERATIONAL_FIELDS = ("log_every_steps", "checkpoint", "eval", "evals", "sharding", "profile_steps")


_ABSENT = "<absent>"


def config_differences(saved: dict, current: dict, prefix: str = "", defaults: Optional[dict] = None) -> list[str]:
    """Dotted names of fields whose values differ (operational fields excluded).

    A field absent from the saved config (written before the field existed)
    whose current value is its ``base_config`` default is not a difference:
    the older run computed with that default.
    """
    defaults = config_lib.base_config().to_dict() if defaults is None else defaults
    diffs = []
    for key in sorted(set(saved) | set(current)):
        field = f"{prefix}{key}"
        if field in OPERATIONAL_FIELDS:
            continue
        a, b = saved.get(key, _ABSENT), current.get(key, _ABSENT)
        default = defaults.get(key, _ABSENT) if isinstance(defaults, dict) else _ABSENT
        if isinstance(b, dict) and a is _ABSENT:
            a = {}  # a section the older run did not have: compare its fields with their defaults
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_differences(a, b, f"{field}.", default if isinstance(default, dict) else {})
        elif a is _ABSENT and default is not _ABSENT and _normalise(b) == _normalise(default):
            continue
        elif _normalise(a) != _normalise(b):
            diffs.append(f"{field}: {a!r} -> {b!r}")
    return diffs


def _normalise(value):
    return json.loads(json.dumps(value))


def _resume_defaults(config) -> dict:
    """Defaults of every field, the open 'model' and 'loss' sections included (the chosen encoder's and
    loss's keywords), so that a field added to them since a run was saved is no difference."""
    from clrjax import models

    defaults = config_lib.base_config().to_dict()
    with contextlib.suppress(ValueError, KeyError):
        defaults["model"] = models.resolve_model_config({"name": config.model.name})
    with contextlib.suppress(ValueError, KeyError):
        defaults["loss"] = methods.get(config.method).loss_kwarg_defaults()
    return defaults


def check_resume_config(workdir: str, config, allow_change: bool) -> None:
    """Refuses to resume a run whose saved config differs, unless allowed."""
    path = storage.join(workdir, "config.json")
    if not storage.exists(path):
        return
    saved = json.loads(storage.read_text(path))
    diffs = config_differences(saved, config.to_dict(), defaults=_resume_defaults(config))
    if saved.get("method") != config.method:
        raise config_lib.ConfigError(
            f"the workdir {workdir} holds a {saved.get('method')} run and this config trains "
            f"{config.method}; a method change cannot resume (even with --allow_config_change): "
            "use a new --workdir.")
    if diffs and not allow_change:
        raise config_lib.ConfigError(
            f"the workdir {workdir} holds a run with a different config ({'; '.join(diffs)}); "
            "use a new --workdir, or pass --allow_config_change to resume with the new values.")
    if diffs:
        logging.warning("Resuming with a changed config: %s", "; ".join(diffs))


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class RunResult:
    state: TrainState
    exp: Experiment
    final_metrics: dict
    steps_run: int
    stopped_early: bool = False

    def initial_state(self) -> TrainState:
        """The run's state at step 0 (same seed): the random-init baseline of the evaluation."""
        return init_train_state(self.exp)


def _check_workdir_writable(workdir: str) -> None:
    try:
        storage.makedirs(workdir)
        # One probe file per process: processes sharing a workdir would remove each other's.
        # Unique per process: processes sharing a workdir must not delete each other's probe.
        probe = storage.join(workdir, f".write_test.{socket.gethostname()}.{os.getpid()}")
        with storage.open(probe, "w") as f:
            f.write("ok")
        storage.remove(probe)
    except storage.StorageUnsupportedError as err:
        raise config_lib.ConfigError(f"the workdir {err}") from None
    except OSError as err:
        raise config_lib.ConfigError(
            f"the workdir {workdir} is not writable ({err.strerror}); choose a --workdir you can write to.") from None


def _host_scalars(step_metrics) -> dict:
    host = jax.device_get({k: v for k, v in step_metrics.items() if k != LEAVES_FINITE})
    return {k: (bool(v) if k == "finite" else float(v)) for k, v in host.items()}


def train(config, workdir: str, *, mesh=None, allow_config_change: bool = False,
          stop_after_steps: Optional[int] = None, should_stop: Optional[Callable[[], bool]] = None) -> RunResult:
    """Pretrains (or resumes) the run in ``workdir`` until ``total_steps``.

    ``stop_after_steps`` ends this invocation early after that many steps (a
    checkpoint is written), which is how tests emulate an interrupted run.
    ``should_stop`` is polled after each step (e.g. a SIGTERM flag); when it
    returns True the loop saves and returns with ``stopped_early``.
    Each process holds a lock on the workdir for the invocation (a second
    trainer raises ``workdir_lock.WorkdirBusyError``), and the run resumes from
    the newest checkpoint that verifies against its checksums (damaged newer
    ones are moved aside with a warning; none intact raises
    ``checkpoint.NoIntactCheckpointError``); see docs/FAULTS.md.
    """
    main = parallel.is_main_process()
    # build_experiment validates the config first: a bad config fails before the workdir is created.
    exp = build_experiment(config, mesh)
    # Fields that follow from the data (e.g. image_folder class names) are recorded in config.json.
    datasets.record_derived_fields(config)
    _check_workdir_writable(workdir)
    # Taken before anything in the workdir is read or written; held until this invocation ends.
    with workdir_lock.WorkdirLock(workdir):
        return _train_locked(exp, config, workdir, main, allow_config_change, stop_after_steps, should_stop)


def _train_locked(exp, config, workdir, main, allow_config_change, stop_after_steps, should_stop) -> RunResult:
    """:func:`train` once this process holds the workdir: resume, run, save."""
    check_resume_config(workdir, config, allow_config_change)

    state = init_train_state(exp)
    warn_ghost_batchnorm(config, state.batch_stats)
    checkpointer = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"),
                                         every_steps=config.checkpoint.every_steps,
                                         keep=config.checkpoint.keep,
                                         async_save=config.checkpoint.async_save)
    for leftover in checkpointer.leftovers:
        logging.warning("Ignoring incomplete checkpoint %s (an interrupted save).", leftover)
    latest, elapsed_before, cut_before = None, 0.0, 0
    try:
        # Verified against the checksums saved with it; damaged newer steps are moved aside
        # with a warning, none intact raises NoIntactCheckpointError (clrjax/checkpoint.py).
        restored = checkpointer.restore_newest_intact(ckpt_lib.abstract_like(state))
    except ckpt_lib.CheckpointMismatchError as err:
        checkpointer.close()
        raise config_lib.ConfigError(
            f"{err}; it was written with a different method/model/projector/optimizer "
            "(see config.json): use a new --workdir.") from None
    except BaseException:
        checkpointer.close()
        raise
    if restored is not None:
        latest, state, meta = restored
        elapsed_before = float(meta.get("elapsed_s", 0.0))
        cut_before = data_counters.restored_captions_cut(meta)
        _announce(main, f"Resumed from step {latest} in {checkpointer.directory}")
    if main:
        metrics_lib.write_config_json(workdir, config)
        metrics_lib.truncate_after(workdir, latest)  # steps after the checkpoint are replayed: log them once

    start = int(jax.device_get(state.step))
    if start >= exp.total_steps:
        _announce(main, f"Run in {workdir} already finished ({start}/{exp.total_steps} steps).")
        checkpointer.close()
        return RunResult(state, exp, _last_logged(workdir), 0)

    end = exp.total_steps if stop_after_steps is None else min(exp.total_steps, start + stop_after_steps)
    try:
        result = _run_steps(exp, state, start, end, workdir, checkpointer, main, should_stop, elapsed_before,
                            cut_before)
    except BaseException:
        # The error that stopped the run is the one to report; a second one
        # from shutting down the checkpoint manager would only hide it.
        with contextlib.suppress(Exception):
            checkpointer.close()
        raise
    checkpointer.close()
    if main and result.state is not None and int(result.state.step) >= exp.total_steps:
        metrics_lib.plot_curves(storage.join(workdir, "metrics.jsonl"), storage.join(workdir, "curves.png"))
    return result


def warn_ghost_batchnorm(config, batch_stats) -> None:
    """Gradient caching with BatchNorm trains a different objective: say so (clrjax/gradient_cache.py)."""
    if config.micro_batch_size and gradient_cache.has_batch_statistics(batch_stats):
        logging.warning(
            "config.micro_batch_size=%d with BatchNorm layers: each micro-batch of %d examples is normalised "
            "with its own statistics (ghost BatchNorm), so the gradient is exact for that objective, not for "
            "global-batch BatchNorm. For the exact large-batch gradient use networks without BatchNorm: a ViT "
            "or --config.model.norm=group (ResNets), with --config.projector.use_bn=False "
            "(and --config.predictor.use_bn=False).", config.micro_batch_size, config.micro_batch_size)


def _announce(main: bool, message: str) -> None:
    """A line the user should see on the console (process 0) and in the log."""
    logging.info(message)
    if main:
        print(message, flush=True)


def _last_logged(workdir: str) -> dict:
    path = storage.join(workdir, "metrics.jsonl")
    rows = metrics_lib.read_metrics(path) if storage.exists(path) else []
    return rows[-1] if rows else {}


def _run_steps(exp, state, start, end, workdir, checkpointer, main, should_stop,
               elapsed_before: float = 0.0, captions_cut_before: int = 0) -> RunResult:
    """Steps ``start..end``; ``elapsed_before`` is the training time of earlier invocations,
    ``captions_cut_before`` the captions they cut (the checkpoint's count)."""
    config = exp.config
    t_start = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - t_start

    step_fn = make_train_step(exp)
    loader = pipeline.TrainLoader(exp.train_source, config.batch_size, config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  start_step=start)
    # captions_cut and data_skipped over all processes (clrjax/data/counters.py): a collective
    # in multi-process runs, reached by every process at the same logging and saving steps.
    counts = data_counters.DataCounters(exp.train_source, loader, captions_cut_before, jax.process_count())
    writer = metrics_lib.MetricWriter(workdir, enabled=main)
    progress = metrics_lib.ProgressLine(exp.total_steps) if main else None
    # On every process: each extracts its share of the evaluation splits (protocols.source_features).
    evaluation = _periodic_evaluation(exp)
    leaf_names = [name for name, _ in checked_leaves(state)]
    profiler = profiling.StepProfiler(config.profile_steps, workdir, enabled=main)

    def check_finite(pending):
        _check_finite(pending, config.nonfinite.policy, config.nonfinite.max_consecutive_skips,
                      checkpointer, leaf_names)

    pending = None          # the previous step's metrics, read one step late so the host never stalls the device
    last_logged, stopped_early = {}, False
    t_last, steps_since_log = time.perf_counter(), 0
    try:
        for step in range(start, end):
            batch = parallel.host_to_global(model_batch(next(loader)), exp.mesh)
            profiler.before_step(step)
            state, step_metrics = step_fn(state, batch)
            profiler.after_step(step + 1, step_metrics)
            # Only metrics are kept: the state's buffers are donated to the next step.
            previous, pending = pending, (step + 1, step_metrics)
            check_finite(previous)
            steps_since_log += 1
            done = step + 1
            if done % config.log_every_steps == 0 or done == end:
                scalars = _host_scalars(step_metrics)
                interval = time.perf_counter() - t_last
                scalars["images_per_sec"] = steps_since_log * config.batch_size / max(interval, 1e-9)
                scalars["epoch"] = done / exp.steps_per_epoch
                scalars["elapsed_s"] = elapsed()  # cumulative over resumes (kept in checkpoint meta)
                scalars.update(counts.values())  # data_skipped (own files), captions_cut (image-text)
                writer.write_scalars(done, scalars)
                if progress is not None:
                    progress.update(done, {k: scalars[k] for k in ("loss", "probe_acc")}, config.batch_size)
                last_logged = dict(scalars, step=done)
                t_last, steps_since_log = time.perf_counter(), 0
            if evaluation is not None and evaluation.due(done, exp.total_steps):
                results = evaluation(encoder_variables_of(state), done, exp.total_steps)
                writer.write_scalars(done, results)
                logging.info("step %d evaluation: %s", done, results)
                last_logged.update(results)
                t_last = time.perf_counter()  # evaluation time is not training throughput
            if _agreed_stop(should_stop, done, config.log_every_steps) or checkpointer.reached_preemption(done):
                stopped_early = True
            if checkpointer.should_save(done) or done == end or stopped_early:
                check_finite(pending)
                pending = None  # checked: never save a state whose step is unverified
                checkpointer.save(done, state, _meta(loader, done, elapsed(), counts), force=True)
            if stopped_early:
                break
        check_finite(pending)
        checkpointer.wait()
    finally:
        profiler.stop()
        loader.close()
        writer.close()
    return RunResult(state, exp, last_logged, int(jax.device_get(state.step)) - start, stopped_early)


def encoder_variables_of(state: TrainState) -> dict:
    """The variables the model's ``encode`` reads: params and BatchNorm statistics, replicated
    (an FSDP state is gathered: evaluation encodes with whole parameters on every device)."""
    return state_sharding.gathered({"params": state.params, "batch_stats": state.batch_stats})


def _periodic_evaluation(exp: Experiment):
    """The ``config.evals`` evaluators of this run, or None when none is on."""
    from clrjax.evaluation import periodic, run_eval  # local: evaluation is not needed to train
    if not periodic.enabled(exp.config):
        return None
    encode = run_eval.make_encode_fn(exp.model, exp.config.augment.to_dict())
    towers = None
    if hasattr(exp.model, "encode_text"):  # a two-tower model: the zero_shot and retrieval evaluators
        from clrjax.evaluation import zero_shot
        towers = zero_shot.tower_fns(exp.model, exp.config.augment.to_dict())
    return periodic.PeriodicEvaluation(encode, exp.config, towers=towers)


def _check_periodic_data(config, test_source) -> None:
    """An evaluator of ``config.evals`` the test split cannot feed (zero_shot without class names,
    retrieval without captions) fails before training, not at its first evaluation."""
    from clrjax.evaluation import periodic  # local: evaluation is not needed to train
    problem = periodic.data_problem(config, test_source) if periodic.enabled(config) else None
    if problem:
        raise config_lib.ConfigError(problem)


def _agreed_stop(should_stop, step: int, every: int) -> bool:
    """Whether to stop after ``step``; all processes agree on the same step.

    One process may get SIGTERM before another; stopping alone would leave the
    others waiting forever in a collective. In multi-process runs the flags are
    combined every ``every`` steps (SLURM and TPU VMs give tens of seconds of
    notice; a host sync every step would stall the device pipeline).
    """
    if should_stop is None:
        return False
    if jax.process_count() == 1:
        return bool(should_stop())
    if step % every:
        return False
    from jax.experimental import multihost_utils
    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(should_stop())))).any())


# Per-example fields of a host batch that travel to the devices (the rest is host bookkeeping).
# 'text': caption tokens int32 [B, L] of image-text data.
MODEL_FIELDS = ("image", "label", "index", "text")


def model_batch(batch: dict) -> dict:
    """The fields of a host batch the step reads, each with leading axis B (the batch's examples)."""
    return {k: batch[k] for k in MODEL_FIELDS if k in batch}


def _meta(loader, step: int, elapsed_s: float, counts=None) -> dict:
    meta = {"step": step, "data": loader.state(), "elapsed_s": elapsed_s}
    return meta if counts is None else dict(meta, **counts.for_checkpoint())


def _check_finite(pending, policy: str, max_skips: int, checkpointer, leaf_names) -> None:
    """Raises NonFiniteError per the policy when the pending step's update was dropped."""
    if pending is None:
        return
    step, step_metrics = pending
    finite = bool(jax.device_get(step_metrics["finite"]))
    if finite:
        return
    host = jax.device_get(step_metrics)
    bad = [f"{k}={float(host[k])}" for k in ("loss", "probe_loss", "grad_norm") if not np.isfinite(host[k])]
    bad_leaves = [name for name, ok in zip(leaf_names, host[LEAVES_FINITE]) if not ok]
    if bad_leaves:
        more = f" and {len(bad_leaves) - 3} more" if len(bad_leaves) > 3 else ""
        bad.append(f"non-finite state {', '.join(bad_leaves[:3])}{more}")
    last_good = checkpointer.latest_step()
    skips = int(host["consecutive_skips"])
    if policy == "stop" or skips >= max_skips:
        checkpointer.wait()
        raise NonFiniteError(
            f"non-finite values at step {step} ({'; '.join(bad)}); "
            f"the update was not applied and the last good checkpoint is step {last_good}. "
            "Lower the learning rate, or set --config.nonfinite.policy=skip to drop such updates.")
    logging.warning("Step %d: non-finite values (%s); update skipped (%d in a row).", step, "; ".join(bad), skips)
