"""Text towers: a Transformer over token ids in the CLIP layout, for image-text methods.

Source: Radford et al., "Learning Transferable Visual Models From Natural
Language Supervision" (2021), sec. 2.4, and the official CLIP code
(``clip/model.py``: ``CLIP.encode_text``, ``ResidualAttentionBlock``,
``initialize_parameters``):

* token embedding + learned positional embedding;
* ``layers`` pre-LayerNorm residual blocks, ``x + attn(ln_1(x))`` then
  ``x + mlp(ln_2(x))``, the MLP ``width -> mlp_ratio*width -> width`` with
  QuickGELU ``x * sigmoid(1.702 x)`` (CLIP) or exact GELU;
* a causal attention mask (position i attends to positions <= i);
* a final LayerNorm (``ln_final``); CLIP's features are the final-LN hidden
  state at the end-of-text token, which CLIP finds as ``text.argmax(-1)``
  because its EOT token has the highest id of its vocabulary.

Here EOS pooling takes the position of the **first** ``eos_id`` in each row:
the id the tokenizer writes after the text (``clrjax.data.tokenizers``:
``tok.eot_id``; the byte tokenizer's is its highest id, 258, so this is
CLIP's argmax too). Every row must hold one (the tokenizers always write it).

Differences from CLIP, on purpose: padding (``pad_id``) is masked out of the
attention keys in both modes, so appending pads never changes any feature
(CLIP pads with 0 and relies on the causal mask alone, which makes only the
EOT feature independent of the padding); the input may be shorter than
``context_length`` (the first L positional embeddings are used). The
projection to the joint space (CLIP's ``text_projection``) is not part of
this module: the image-text method owns it.

'mean' pooling: the mean of the final-LN hidden states over the non-pad
positions (sot and eot included); use it with ``causal=False``
(bidirectional), which is what the SigLIP preset's text tower is
(big_vision ``models/proj/image_text/text_transformer.py`` runs its text
through the bidirectional ``vit.Encoder``; it pools 'last', the sticky EOS
of its padding, which EOS pooling with masked pads equals in spirit).

Parameter names follow CLIP's state dict (``token_embedding``,
``positional_embedding``, ``resblocks_{i}/{ln_1, attn/in_proj,
attn/out_proj, ln_2, mlp/c_fc, mlp/c_proj}``, ``ln_final``). Initialisation
as CLIP's ``initialize_parameters``: token embedding N(0, 0.02^2),
positional N(0, 0.01^2), attention in-projection std ``width^-0.5``, output
projections std ``width^-0.5 (2 layers)^-0.5``, MLP input std
``(2 width)^-0.5``; biases zero (CLIP's attention biases are zero too; its MLP biases keep
PyTorch's default uniform init, which is not reproduced).

Shapes: ``tokens`` int32 ``[n, L]`` with ``L <= context_length`` ->
float32 ``[n, width]``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

POOLINGS = ("eos", "mean")
ACTIVATIONS = ("quick_gelu", "gelu")
_LN_EPS = 1e-5  # CLIP's LayerNorm is torch's default

# name -> TextTransformer keyword arguments. vocab_size / pad_id / eos_id are the tokenizer's
# (build_text_tower fills them from it); the values here are the papers' vocabularies.
TEXT_PRESETS: Dict[str, Dict[str, Any]] = {
    # CPU-sized, for tests and the offline demo (byte tokenizer: 259 ids).
    "tiny": dict(vocab_size=259, context_length=32, width=64, layers=2, heads=2),
    # CLIP sec. 2.4: "a 63M-parameter 12-layer 512-wide model with 8 attention heads", a BPE of
    # 49,152 merges (vocabulary 49,408 with the special tokens), context 77 (official model.py).
    "clip_b": dict(vocab_size=49408, context_length=77, width=512, layers=12, heads=8),
    # CLIP ViT-L/14's text tower (official clip/model.py build_model on the released weights:
    # transformer_width 768, heads 12, 12 layers).
    "clip_l": dict(vocab_size=49408, context_length=77, width=768, layers=12, heads=12),
    # SigLIP B text tower (Zhai et al. 2023): big_vision models/proj/image_text/text_transformer.py
    # with variant 'B' (vit.decode_variant: width 768, depth 12, heads 12, MLP 3072), its text run
    # through the bidirectional vit.Encoder (no causal mask, exact GELU); vocabulary 32,000 and 64
    # positions as the released B/16 models (HF transformers SiglipTextConfig defaults).
    "siglip_b": dict(vocab_size=32000, context_length=64, width=768, layers=12, heads=12,
                     causal=False, activation="gelu"),
}


def _normal(std: float):
    return nn.initializers.normal(stddev=std)


def _dense(features: int, std: float, dtype, name: str):
    """An ``nn.Dense`` (parameters ``name/{kernel, bias}``) applied to the rows of ``[..., in]``
    flattened to ``[rows, in]``: the same maths, but XLA:CPU runs the weight gradient of a dense
    layer on a 3-D ``[n, L, in]`` input through a transposing copy and a slower dot, about 3.5x
    the 2-D layer's fwd+bwd time at n=256, L=64, 64 -> 256 (measured on 2 CPU cores; the
    tiny tower's step took 1.8 s instead of 0.5 s)."""
    layer = nn.Dense(features, kernel_init=_normal(std), dtype=dtype, param_dtype=jnp.float32, name=name)

    def apply(x):
        return layer(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1] + (features,))
    return apply


class _SelfAttention(nn.Module):
    """Multi-head self-attention with a boolean mask ``[n, 1, L, L]`` (True = may attend)."""

    width: int
    heads: int
    out_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        n, length, _ = x.shape
        head_dim = self.width // self.heads
        qkv = _dense(3 * self.width, self.width ** -0.5, self.dtype, "in_proj")(x)
        q, k, v = jnp.split(qkv.reshape(n, length, 3, self.heads, head_dim), 3, axis=2)
        q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim)
        # Masked keys get -inf, so their weights are exactly 0 (pads and the future add nothing).
        logits = jnp.where(mask, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(n, length, self.width)
        return _dense(self.width, self.out_std, self.dtype, "out_proj")(out)


class _Mlp(nn.Module):
    width: int
    hidden: int
    activation: str
    out_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = _dense(self.hidden, (2 * self.width) ** -0.5, self.dtype, "c_fc")(x)
        # CLIP trained with QuickGELU (official model.py); SigLIP/big_vision use exact GELU.
        x = x * jax.nn.sigmoid(1.702 * x) if self.activation == "quick_gelu" else nn.gelu(x, approximate=False)
        return _dense(self.width, self.out_std, self.dtype, "c_proj")(x)


class _Block(nn.Module):
    width: int
    heads: int
    mlp_ratio: int
    activation: str
    out_std: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        ln = lambda name: nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32,  # noqa: E731
                                       name=name)
        x = x + _SelfAttention(self.width, self.heads, self.out_std, self.dtype, name="attn")(ln("ln_1")(x), mask)
        return x + _Mlp(self.width, self.mlp_ratio * self.width, self.activation, self.out_std, self.dtype,
                        name="mlp")(ln("ln_2")(x))


def attention_mask(tokens: jnp.ndarray, pad_id: int, causal: bool) -> jnp.ndarray:
    """bool [n, 1, L, L]: query i may attend to key j iff j is not padding (and j <= i when causal)."""
    keys = (tokens != pad_id)[:, None, None, :]
    if not causal:
        return keys
    length = tokens.shape[1]
    return keys & jnp.tril(jnp.ones((length, length), bool))[None, None]


def eos_positions(tokens: jnp.ndarray, eos_id: int) -> jnp.ndarray:
    """int32 [n]: the position of the first ``eos_id`` in each row (argmax of the first True)."""
    return jnp.argmax(tokens == eos_id, axis=-1).astype(jnp.int32)


class TextTransformer(nn.Module):
    """The CLIP-layout text Transformer (module docstring): tokens int32 [n, L] -> float32 [n, width].

    Attributes:
      vocab_size, context_length: token ids are in [0, vocab_size); L <= context_length.
      width, layers, heads: model width, residual blocks, attention heads (width % heads == 0).
      mlp_ratio: MLP hidden width / width (4 in CLIP and SigLIP).
      pooling: 'eos' (the hidden state at the first ``eos_id``, CLIP) or 'mean' (over non-pad tokens).
      causal: causal attention mask (CLIP); False = bidirectional (SigLIP, mean pooling).
      pad_id, eos_id: the tokenizer's padding and end-of-text ids (eos_id -1 = vocab_size - 1,
        the highest id, as CLIP's EOT).
      activation: 'quick_gelu' (CLIP) or 'gelu' (exact; SigLIP).
      dtype: compute dtype; parameters, softmax and the output are float32.
    """

    vocab_size: int
    context_length: int
    width: int
    layers: int
    heads: int
    mlp_ratio: int = 4
    pooling: str = "eos"
    causal: bool = True
    pad_id: int = 0
    eos_id: int = -1
    activation: str = "quick_gelu"
    dtype: Any = jnp.float32

    def _check(self, tokens) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"tokens must be [n, L] with L <= context_length={self.context_length}, "
                             f"got shape {tokens.shape}")

    @property
    def end_id(self) -> int:
        return self.vocab_size - 1 if self.eos_id < 0 else self.eos_id

    @nn.compact
    def __call__(self, tokens, train: bool = False):
        """tokens int32 [n, L] -> float32 [n, width]. ``train`` is unused (no dropout), kept for the signature."""
        del train
        self._check(tokens)
        tokens = jnp.asarray(tokens, jnp.int32)
        length = tokens.shape[1]
        x = nn.Embed(self.vocab_size, self.width, embedding_init=_normal(0.02), dtype=self.dtype,
                     param_dtype=jnp.float32, name="token_embedding")(tokens)
        pos = self.param("positional_embedding", _normal(0.01), (self.context_length, self.width), jnp.float32)
        x = x + pos[:length].astype(x.dtype)
        mask = attention_mask(tokens, self.pad_id, self.causal)
        out_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        for i in range(self.layers):
            x = _Block(self.width, self.heads, self.mlp_ratio, self.activation, out_std, self.dtype,
                       name=f"resblocks_{i}")(x, mask)
        x = nn.LayerNorm(epsilon=_LN_EPS, dtype=self.dtype, param_dtype=jnp.float32, name="ln_final")(x)
        x = x.astype(jnp.float32)
        if self.pooling == "eos":
            return x[jnp.arange(x.shape[0]), eos_positions(tokens, self.end_id)]
        keep = (tokens != self.pad_id).astype(jnp.float32)[..., None]
        return (x * keep).sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)


_FIELDS = ("vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio", "pooling", "causal",
           "pad_id", "eos_id", "activation", "dtype")


def text_tower_kwargs(cfg: Mapping[str, Any], tokenizer=None) -> Dict[str, Any]:
    """The TextTransformer keyword arguments of ``cfg``: ``TEXT_PRESETS[cfg['preset']]``, then ``cfg``'s fields.

    With a tokenizer (``clrjax.data.tokenizers``), its ``vocab_size``, ``pad_id``, ``eot_id`` and
    ``context_length`` replace the preset's (they must match what the data pipeline writes)
    unless ``cfg`` sets them.
    'dtype' may be a string ('float32', 'bfloat16').
    """
    cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    preset = cfg.pop("preset", None)
    if preset is not None and preset not in TEXT_PRESETS:
        raise ValueError(f"unknown text tower preset {preset!r}; use one of {', '.join(TEXT_PRESETS)}")
    unknown = sorted(set(cfg) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown text tower field(s) {unknown}; the fields are {', '.join(_FIELDS)} and preset")
    kwargs = dict(TEXT_PRESETS[preset]) if preset else {}
    if tokenizer is not None:
        kwargs.update(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, eos_id=tokenizer.eot_id)
        if getattr(tokenizer, "context_length", None):
            kwargs["context_length"] = int(tokenizer.context_length)
    kwargs.update(cfg)
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[kwargs["dtype"]]
    missing = [f for f in ("vocab_size", "context_length", "width", "layers", "heads") if f not in kwargs]
    if missing:
        raise ValueError(f"the text tower needs {missing}: name a preset ({', '.join(TEXT_PRESETS)}) or set them")
    return kwargs


def build_text_tower(cfg: Mapping[str, Any], tokenizer=None) -> TextTransformer:
    """A :class:`TextTransformer` from ``{'preset': 'clip_b', **overrides}`` (see :func:`text_tower_kwargs`)."""
    return TextTransformer(**text_tower_kwargs(cfg, tokenizer))


def num_text_params(cfg: Mapping[str, Any], context_length: Optional[int] = None) -> int:
    """Parameter count of the tower ``cfg`` builds, from shapes only (``jax.eval_shape``: nothing allocated)."""
    model = build_text_tower(cfg)
    length = context_length or model.context_length
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.ones((1, length), jnp.int32)))
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes)))
