"""Two-tower image-text methods on the generic trainer: the model, LiT locking, the shared Method.

CLIP (``clip.py``) and SigLIP (``siglip.py``) differ only in their loss and
its learnable scalars; everything here is shared.

The model (:class:`TwoTower`, variable names fixed):

  'encoder'          any clrjax encoder (``config.model``): the image tower's
                     features h [B, F] are ``'features'``, evaluated, probed
                     and exported like every method's encoder;
  'image_projection' linear, no bias, F -> ``projector.out_dim`` (CLIP sec. 2.3:
                     "a linear projection to map from each encoder's
                     representation to the multi-modal embedding space");
                     absent with ``image_tower.projection=False`` (then F
                     must equal out_dim);
  'text_encoder'     :class:`clrjax.models.text.TextTransformer`
                     (``text_tower.preset``; vocabulary, pad and end ids and
                     context length from ``config.text``'s tokenizer);
  'text_projection'  linear, no bias, width -> out_dim;
  scalars            CLIP: 'logit_scale' (init log(1/0.07)); SigLIP: 'log_t'
                     (log 10) and 'bias' (-10);
  'probe'            the trainer's online probe on stop_gradient(h).

Distinct captions (``distinct_texts``, a cost saving, not a change of the
maths). The text tower and its projection map each token row on its own
(LayerNorm, no batch statistics, no dropout), so equal rows give equal
embeddings. Captions written from class names (``*_captions``,
clrjax/data/class_captions.py) have at most classes x templates distinct rows
(80 on digits and Fashion-MNIST), while a CPU batch has 256: the tower would
encode each caption about 3 times. With ``distinct_texts = K < n`` the n rows
are sorted, each distinct row is encoded once (K slots) and the embeddings are
gathered back to the n rows, so the value is the same and the gradient is the
same sum (the gather's transpose adds the equal rows' cotangents before they
enter the tower instead of after: float32 summation order only). A batch with
more than K distinct rows is encoded row by row (``nn.cond``), never truncated.
Measured on digits (batch 256, 2 shared CPU cores): the step takes about half
the time it takes with every row encoded.

How the learnable scalars reach the loss. The trainer shards every loss
input by rows (``in_specs=P('data')``), and gradient caching merges
micro-batch outputs along the batch axis, so every output needs leading axis
B. The scalars therefore leave the model broadcast to every row,
``'logit_params'`` [B, P], and the loss reads the copy on *global row 0*
(:func:`scalars_of`): ``psum`` over the devices of shard 0's row 0 and zeros
on the other shards. That value is provably replicated (the trainer declares
the loss replicated, ``out_specs=P()``), equals the parameter exactly, and
its whole gradient lands on global row 0 -- the same row on one device or
eight; the broadcast's transpose sums it back into the parameter.

LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning", sec. 3: "locked image, unlocked text", the "Lu" setting):
``image_tower.init_from`` names a clrjax run directory (latest checkpoint)
or an export; its encoder variables replace the randomly initialised ones
(shapes checked against ``config.model`` before anything compiles). With
``image_tower.locked`` the encoder's parameters are the 'frozen' optimizer
group (no update, no optimizer state), it runs in inference mode (BatchNorm
uses and keeps its running statistics) and its features are stop-gradient,
so no backward pass runs through it; the projection, the text tower and the
scalars train. ``locked=False`` with ``init_from`` is LiT's "Uu" (initialised,
unlocked); no ``init_from`` is training from scratch ("uu").
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from clrjax.losses import _collectives as col
from clrjax.methods.base import PROBE_COLLECTION, Method
from clrjax.models.heads import LinearProbe

SCALARS = "logit_params"  # the model output carrying the learnable scalars, [B, P]


class _Pretrained:
    """Encoder variables to start the image tower from (held by identity: never hashed by value)."""

    def __init__(self, variables: Mapping[str, Any]):
        self.variables = {k: v for k, v in variables.items() if v}

    def into(self, variables: Mapping[str, Any]) -> Dict[str, Any]:
        """``variables`` with their 'encoder' subtrees replaced by the pretrained ones."""
        out = dict(variables)
        for collection, tree in self.variables.items():
            out[collection] = dict(out.get(collection, {}), encoder=jax.tree.map(jnp.asarray, tree))
        return out


class TwoTower(nn.Module):
    """Image tower + text tower + learnable scalars + online probe (module docstring).

    ``__call__(inputs, train)``: ``inputs`` is ``{'image': float [n, S, S, C],
    'text': int32 [n, L]}``, or an image array alone (the trainer's
    initialisation, which then runs the text tower on placeholder tokens).
    """

    encoder: nn.Module
    text_encoder: nn.Module
    embed_dim: int
    num_classes: int
    scalar_inits: Tuple[Tuple[str, float], ...]
    locked: bool = False
    project_image: bool = True
    pretrained: Any = None
    distinct_texts: int = 0  # at most this many distinct caption rows per batch (module docstring); 0 = unknown

    def setup(self):
        self.probe = LinearProbe(self.num_classes)
        if self.project_image:
            self.image_projection = nn.Dense(self.embed_dim, use_bias=False, name="image_projection")
        self.text_projection = nn.Dense(self.embed_dim, use_bias=False, name="text_projection")
        self.scalars = [self.param(name, nn.initializers.constant(value), (), jnp.float32)
                        for name, value in self.scalar_inits]

    @nn.nowrap
    def init(self, rngs, *args, **kwargs):
        variables = super().init(rngs, *args, **kwargs)
        return variables if self.pretrained is None else self.pretrained.into(variables)

    def __call__(self, inputs, train: bool) -> Dict[str, jax.Array]:
        if isinstance(inputs, Mapping):
            images, tokens = inputs["image"], inputs["text"]
        else:
            images, tokens = inputs, self._placeholder_tokens(inputs.shape[0])
        h = self.encode(images, train=train)
        image_embedding = self.image_projection(h) if self.project_image else h
        scalars = jnp.stack(self.scalars)
        return {
            "features": h,
            "image_embeddings": image_embedding.astype(jnp.float32),
            "text_embeddings": self.embed_texts(tokens),
            SCALARS: jnp.broadcast_to(scalars, (images.shape[0],) + scalars.shape),
            "probe_logits": self.probe(jax.lax.stop_gradient(h)),
        }

    def encode(self, x, train: bool = False) -> jax.Array:
        """Images -> image features [n, F] (a locked tower: inference mode, no gradient)."""
        h = self.encoder(x, train=train and not self.locked)
        return jax.lax.stop_gradient(h) if self.locked else h

    def embed_image(self, x) -> jax.Array:
        """Images -> image embeddings [n, embed_dim] (not normalised), in inference mode: what zero-shot
        and retrieval compare with :meth:`encode_text` (clrjax/evaluation/zero_shot.py)."""
        h = self.encode(x, train=False)
        return (self.image_projection(h) if self.project_image else h).astype(jnp.float32)

    def encode_text(self, tokens) -> jax.Array:
        """int32 tokens [n, L] -> text embeddings [n, embed_dim] (not normalised)."""
        return self.text_projection(self.text_encoder(tokens)).astype(jnp.float32)

    def embed_texts(self, tokens) -> jax.Array:
        """:meth:`encode_text` of every row, each distinct row encoded once when at most
        ``distinct_texts`` rows differ (module docstring)."""
        size = int(self.distinct_texts)
        if not size or size >= tokens.shape[0]:
            return self.encode_text(tokens)
        rows, inverse, fits = distinct_rows(tokens, size)
        # Rematerialised branches: the backward of a plain cond keeps both branches' activations
        # (the branch not taken as zeros, [n, L, 4 width] each), whose writing cost more than the
        # saving (measured); remat keeps only the inputs and recomputes the taken branch's forward.
        once = nn.checkpoint(lambda m, r, i, t: m.encode_text(r)[i])
        each = nn.checkpoint(lambda m, r, i, t: m.encode_text(t))
        return nn.cond(fits, once, each, self, rows, inverse, tokens, variables="params")

    def _placeholder_tokens(self, n: int) -> jax.Array:
        tower = self.text_encoder
        tokens = jnp.full((n, tower.context_length), tower.pad_id, jnp.int32)
        return tokens.at[:, 0].set(tower.end_id)


def distinct_rows(tokens: jax.Array, size: int) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(rows [size, L], inverse int32 [n], fits): ``tokens == rows[inverse]`` whenever ``fits``,
    i.e. when ``tokens`` [n, L] has at most ``size`` distinct rows (unused slots repeat a real row)."""
    tokens = jnp.asarray(tokens)
    n = tokens.shape[0]
    order = jnp.lexsort(tokens.T[::-1])  # rows in lexicographic order: equal rows are adjacent
    ordered = tokens[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), jnp.any(ordered[1:] != ordered[:-1], axis=1)])
    group = jnp.cumsum(starts.astype(jnp.int32)) - 1  # distinct-row number of each sorted row
    first = jnp.nonzero(starts, size=size, fill_value=0)[0]  # where each distinct row starts
    inverse = jnp.zeros((n,), jnp.int32).at[order].set(group)
    return ordered[first], inverse, group[-1] < size


def scalars_of(outputs, count: int, axis_name=None) -> Tuple[jax.Array, ...]:
    """The ``count`` learnable scalars from global row 0 of ``outputs['logit_params']`` (module docstring).

    Any array with leading axis n_local works (its first ``count`` numbers of row 0 are read),
    so the method harness's random loss inputs fit too.
    """
    row0 = outputs[SCALARS].reshape(outputs[SCALARS].shape[0], -1)[0, :count]
    if axis_name is not None:
        row0 = col.psum(jnp.where(col.axis_index(axis_name) == 0, row0, jnp.zeros_like(row0)), axis_name)
    return tuple(row0[i] for i in range(count))


def pairs_of(outputs) -> Tuple[jax.Array, jax.Array]:
    """(image [n, d], text [n, d]) embeddings of this shard's pairs: views 0 and 1 of 'embeddings'."""
    z = outputs["embeddings"]
    return z[:, 0], z[:, 1]


def _config_error(message: str):
    from clrjax.config import ConfigError  # local: config imports the methods lazily
    return ConfigError(message)


def load_pretrained(config) -> _Pretrained:
    """The encoder variables of ``image_tower.init_from``, checked against ``config.model``."""
    from clrjax.evaluation import restore  # local: evaluation imports the trainer's pieces

    path = config.image_tower.init_from
    field = f"config.image_tower.init_from={path!r}"
    try:
        if os.path.isdir(os.path.join(path, restore.CHECKPOINT_DIR)):
            frozen = restore.from_workdir(path, check_splits=False)
        else:
            frozen = restore.from_export(path, check_splits=False)
        from clrjax import models
        restore.check_variables_fit(models.resolve_model_config(config.model.to_dict()), frozen.variables,
                                    restore.model_input_shape(config), f"{field} does not fit config.model")
    except restore.EvalInputError as err:
        message = str(err)
        raise _config_error(message if message.startswith(field) else f"{field}: {message}") from None
    return _Pretrained(frozen.variables)


@dataclasses.dataclass(frozen=True)
class ImageTextMethod(Method):
    """An image-text loss on a :class:`TwoTower`; subclasses give ``loss`` and ``scalar_inits``.

    Views: one augmented view of each image ('image' [B, S, S, C]) and its caption's tokens
    ('text' [B, L], from the data pipeline). Outputs (leading axis B): 'features' [B, 1, F],
    'probe_logits' [B, 1, C], 'embeddings' [B, 2, d] (view 0 the image, view 1 its
    caption), 'logit_params' [B, P].
    """

    num_views: int = 1
    loss_inputs: Tuple[str, ...] = ("embeddings", SCALARS)
    scalar_inits: Tuple[Tuple[str, float], ...] = ()
    uses_text: bool = True  # the trainer gives the data pipeline config.text's tokenizer

    def build_model(self, config, num_classes: int):
        from clrjax import models
        from clrjax.data import class_captions, tokenizers
        from clrjax.models import text

        image_tower = config.image_tower
        tokenizer = tokenizers.get_tokenizer(config.text.to_dict())
        tower = text.build_text_tower({"preset": config.text_tower.preset,
                                       "context_length": int(config.text.context_length)}, tokenizer)
        embed_dim = int(config.projector.out_dim)
        if not image_tower.projection and models.num_features(config.model.to_dict()) != embed_dim:
            raise _config_error(
                f"config.image_tower.projection is False but the encoder's {models.num_features(config.model)} "
                f"features are not config.projector.out_dim={embed_dim}; set image_tower.projection=True or "
                f"projector.out_dim to the feature width.")
        pretrained = load_pretrained(config) if image_tower.init_from else None
        return TwoTower(encoder=models.build_encoder(config.model.to_dict()), text_encoder=tower,
                        embed_dim=embed_dim, num_classes=int(num_classes), scalar_inits=self.scalar_inits,
                        locked=bool(image_tower.locked), project_image=bool(image_tower.projection),
                        pretrained=pretrained,
                        distinct_texts=class_captions.max_distinct_captions(config.dataset.name, num_classes))

    def param_labels(self, params):
        labels = super().param_labels(params)
        if self.locked_encoder and "encoder" in labels:
            labels["encoder"] = jax.tree.map(lambda _: "frozen", labels["encoder"])
        return labels

    # A frozen dataclass cannot carry run state, so param_labels reads the lock from a
    # per-config copy of the method (:meth:`for_config`).
    locked_encoder: bool = False

    def for_config(self, config) -> "ImageTextMethod":
        return dataclasses.replace(self, locked_encoder=bool(config.image_tower.locked))

    def make_views(self, examples, key, augment_config):
        from clrjax.data import augment
        image = augment.views(examples["image"], examples["index"], key, augment_config, 1)[:, 0]
        return {"image": image, "text": examples["text"]}

    def forward(self, model, variables, views, state, *, train: bool):
        del state
        if train:
            out, mutated = model.apply(variables, views, train=True, mutable=["batch_stats"])
            batch_stats = mutated.get("batch_stats", {})
        else:
            out, batch_stats = model.apply(variables, views, train=False), variables.get("batch_stats", {})
        outputs = {
            "features": out["features"][:, None],
            "probe_logits": out["probe_logits"][:, None],
            "embeddings": jnp.stack([out["image_embeddings"], out["text_embeddings"]], axis=1),
            SCALARS: out[SCALARS],
        }
        return outputs, batch_stats

    def validate(self, config) -> None:
        check_image_text_config(config)


def _has_captions(config) -> bool:
    from clrjax.data.datasets import DATASETS
    if config.dataset.caption_column:
        return True
    name = config.dataset.name
    return name in DATASETS and "caption" in DATASETS.get(name).yields


def check_image_text_config(config) -> None:
    """Captions to train on, and an image tower checkpoint that exists (its shapes: :func:`load_pretrained`)."""
    from clrjax.evaluation import restore

    if not _has_captions(config):
        raise _config_error(
            f"config.dataset.name is {config.dataset.name!r}, which has no captions, but {config.method} trains on "
            f"image-caption pairs; use a captioned dataset (csv/tsv/webdataset/TFDS with dataset.caption_column, "
            f"or a *_captions dataset such as digits_captions).")
    tower = config.image_tower
    if tower.locked and not tower.init_from:
        raise _config_error("config.image_tower.locked is True but config.image_tower.init_from is empty, so the "
                            "locked tower would stay random; set image_tower.init_from to a pretraining run or "
                            "export (or image_tower.locked=False).")
    path = tower.init_from
    if path and not (os.path.isdir(os.path.join(path, restore.CHECKPOINT_DIR))
                     or os.path.isfile(os.path.join(path, restore.export_lib.CONFIG_FILE))
                     or (os.path.isfile(path) and path.endswith(".safetensors"))):
        raise _config_error(f"config.image_tower.init_from is {path!r}, which is neither a run directory (with "
                            f"checkpoints/) nor an export; set it to a clrjax pretraining run or the --out of "
                            f"experiments/export.py.")


__all__ = ["ImageTextMethod", "TwoTower", "SCALARS", "scalars_of", "pairs_of", "distinct_rows", "load_pretrained",
           "PROBE_COLLECTION"]
