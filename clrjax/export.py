"""Encoder-only artifacts for downstream use, and a loader that needs no training code.

``export_encoder(out_dir, model_cfg, encoder_variables)`` writes::

    out_dir/model_config.json        the resolved encoder config (every field, see clrjax.models)
    out_dir/preprocessing.json       only if given: e.g. {'mean': [...], 'std': [...], 'image_size': 32}
    out_dir/encoder/                 Orbax (StandardCheckpointer) checkpoint of the variables
    out_dir/encoder.safetensors      flat float32 arrays + the config in the metadata
    out_dir/encoder_torchvision.pt   ResNets: a torchvision state_dict (needs torch)
    out_dir/encoder_timm.pt          ViTs: a timm vit_*_patch16_224 state_dict (needs torch)

``encoder_variables`` is ``{'params': ..., 'batch_stats': ...}``: the
'encoder' subtree of the :class:`clrjax.models.SSLModel` variables
(``batch_stats`` is absent for ViTs).

Image-text models (clip, siglip): ``export_image_text`` writes the above for
the image encoder plus ``image_text.json`` (text tower fields, tokenizer
settings and ids, learned scalars, the run's augment config),
``tokenizer/<file>`` (a copy of a SentencePiece/BPE vocabulary),
``image_text/`` (Orbax: projections, text tower, scalars) and
``image_text.safetensors`` (every variable, names ``params/encoder/...``,
``params/text_encoder/...``, ``params/text_projection/kernel``,
``params/logit_scale`` or ``params/log_t`` + ``params/bias``, and the
vocabulary bytes as ``tokenizer/vocab_file``; the full table is in
docs/EVALUATION.md, "Image-text exports"). ``load_image_text(path)`` gives
``encode_image`` / ``encode_text`` (L2-normalised joint-space embeddings);
``load_encoder`` still reads the image encoder of such an export.

Names in ``encoder.safetensors``
--------------------------------
``'{collection}/{module}/.../{leaf}'``: the flax variable path joined by '/',
e.g. ``params/conv1/kernel``, ``params/layer1_0/bn1/scale``,
``batch_stats/layer1_0/bn1/mean``, ``params/blocks_3/attn/qkv/kernel``.
Layouts are flax's: conv kernels ``[kh, kw, in, out]`` (HWIO), dense kernels
``[in, out]``. Metadata: ``format='clrjax-encoder'``, ``format_version='1'``,
``model_config=<JSON>`` and, if given, ``preprocessing=<JSON>``. The module names per architecture are listed in the
docstrings of :mod:`clrjax.models.resnet`, :mod:`clrjax.models.vit`,
:mod:`clrjax.models.cnn`.

torchvision names (ResNet-18/34/50, ``encoder_torchvision.pt``)
----------------------------------------------------------------
==================================  ======================================  ===========
flax                                torchvision                             layout
==================================  ======================================  ===========
params/conv1/kernel                 conv1.weight                            HWIO->OIHW
params/bn1/{scale,bias}             bn1.{weight,bias}
batch_stats/bn1/{mean,var}          bn1.{running_mean,running_var}
(none)                              bn1.num_batches_tracked                 int64 0
params/layer{s}_{b}/conv{k}/kernel  layer{s}.{b}.conv{k}.weight             HWIO->OIHW
.../layer{s}_{b}/bn{k}/...          layer{s}.{b}.bn{k}....                  as bn1
.../layer{s}_{b}/downsample_conv    layer{s}.{b}.downsample.0.weight        HWIO->OIHW
.../layer{s}_{b}/downsample_bn      layer{s}.{b}.downsample.1.*             as bn1
params/fc/{kernel,bias}             fc.{weight,bias} (only with a head)     [in,out]->[out,in]
==================================  ======================================  ===========

``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` then loads
every backbone weight; only ``fc.*`` stays missing (the SSL encoder has no
classifier). Exceptions: with ``cifar_stem=True`` ``conv1.weight`` is
``[w, C, 3, 3]``: first set ``model.conv1 = nn.Conv2d(C, w, 3, 1, 1, bias=False)``
and ``model.maxpool = nn.Identity()``; grayscale inputs (C = 1, e.g. the
fashion_mnist presets) need a 1-channel ``conv1`` with either stem; a
``width_multiplier`` other than 1 has no torchvision equivalent (shapes
differ). The complete loading code is below.

timm names (ViT, ``encoder_timm.pt``)
-------------------------------------
===================================  =============================  ==========
flax                                 timm VisionTransformer         layout
===================================  =============================  ==========
params/patch_embed/{kernel,bias}     patch_embed.proj.{weight,bias}  HWIO->OIHW
params/cls_token, params/pos_embed   cls_token, pos_embed           same
params/blocks_{i}/norm{1,2}/scale    blocks.{i}.norm{1,2}.weight
params/blocks_{i}/attn/qkv/kernel    blocks.{i}.attn.qkv.weight     [in,out]->[out,in]
params/blocks_{i}/attn/proj/...      blocks.{i}.attn.proj....       as qkv
params/blocks_{i}/mlp/fc{1,2}/...    blocks.{i}.mlp.fc{1,2}....     as qkv
params/norm/{scale,bias}             norm.{weight,bias}
params/head/{kernel,bias}            head.{weight,bias} (if any)    [in,out]->[out,in]
===================================  =============================  ==========

``pos_embed`` has ``1 + (H/16)(W/16)`` rows for the training image size
(197 only at 224x224): build the timm model with ``img_size=`` the training
size; with ``num_classes=0`` (no head) every key loads strictly.

Loading, per format (what a user writes)
----------------------------------------
clrjax, from the directory (Orbax) or the single .safetensors file::

    from clrjax.export import load_encoder
    encoder = load_encoder("out_dir")                       # or "out_dir/encoder.safetensors"
    features = encoder(images)                              # float [B, H, W, C] -> [B, F]

``load_encoder(path, dtype='float32')`` computes in float32 by default, also
for exports of bfloat16 runs (``dtype=None``: the recorded dtype).

Flax without the loader (Orbax)::

    import json, orbax.checkpoint as ocp
    from clrjax.models import build_encoder
    cfg = json.load(open("out_dir/model_config.json"))
    variables = ocp.StandardCheckpointer().restore("/abs/path/out_dir/encoder")
    features = build_encoder(dict(cfg, dtype="float32")).apply(variables, images, train=False)

safetensors (any framework; numpy shown)::

    from safetensors.numpy import load_file
    arrays = load_file("out_dir/encoder.safetensors")       # {'params/conv1/kernel': ndarray, ...}

PyTorch / torchvision (ResNet), complete: stems, ``model.eval()`` (BatchNorm
with its running statistics; in training mode the features are wrong) and
the recorded preprocessing (the same block as docs/EVALUATION.md, run by
tests/test_export.py)::

    import json, torch, torchvision
    from PIL import Image
    from torchvision import transforms

    export = "runs/simclr_c10/export"
    cfg = json.load(open(f"{export}/model_config.json"))       # name, cifar_stem, ...
    pre = json.load(open(f"{export}/preprocessing.json"))      # mean, std, image_size
    state_dict = torch.load(f"{export}/encoder_torchvision.pt")

    model = getattr(torchvision.models, cfg["name"])()         # resnet18, resnet34 or resnet50
    width, channels = state_dict["conv1.weight"].shape[:2]     # 64; 3 (RGB) or 1 (grayscale presets)
    if cfg["cifar_stem"]:                                      # 3x3 stride-1 stem conv, no max-pool
        model.conv1 = torch.nn.Conv2d(channels, width, 3, 1, 1, bias=False)
        model.maxpool = torch.nn.Identity()
    elif channels != 3:
        model.conv1 = torch.nn.Conv2d(channels, width, 7, 2, 3, bias=False)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    model.fc = torch.nn.Identity()                             # the encoder has no classifier
    model.eval()                                               # BatchNorm with its running statistics

    preprocess = transforms.Compose([
        transforms.Resize(pre["image_size"]),                  # shorter side; bilinear, antialiased
        transforms.CenterCrop(pre["image_size"]),
        transforms.ToTensor(),                                 # uint8 HWC -> float CHW in [0, 1]
        transforms.Normalize(pre["mean"], pre["std"]),
    ])
    image = Image.open("image.png").convert("RGB" if channels == 3 else "L")
    with torch.no_grad():
        features = model(preprocess(image).unsqueeze(0))       # [1, 512] (resnet18/34) or [1, 2048]

PyTorch / timm (ViT)::

    import json, timm, torch
    from PIL import Image
    from torchvision import transforms

    export = "runs/vit_c10/export"
    cfg = json.load(open(f"{export}/model_config.json"))       # name: vit_tiny, vit_small or vit_base
    pre = json.load(open(f"{export}/preprocessing.json"))      # mean, std, image_size
    state_dict = torch.load(f"{export}/encoder_timm.pt")

    channels = state_dict["patch_embed.proj.weight"].shape[1]  # 3 (RGB) or 1 (grayscale presets)
    model = timm.create_model(f"{cfg['name']}_patch16_224", num_classes=0,  # no head: features
                              img_size=pre["image_size"], in_chans=channels)
    model.load_state_dict(state_dict)                          # every key, no head
    model.eval()

    preprocess = transforms.Compose([
        transforms.Resize(pre["image_size"]),                  # shorter side; bilinear, antialiased
        transforms.CenterCrop(pre["image_size"]),
        transforms.ToTensor(),                                 # uint8 HWC -> float CHW in [0, 1]
        transforms.Normalize(pre["mean"], pre["std"]),
    ])
    image = Image.open("image.png").convert("RGB" if channels == 3 else "L")
    with torch.no_grad():
        features = model(preprocess(image).unsqueeze(0))       # [1, 192] (tiny), 384 (small), 768 (base)

Inputs are float NHWC for clrjax and NCHW for torch, normalised exactly as in
training. The export does not apply any normalisation; pass the training
pipeline's to ``export_encoder(..., preprocessing={...})`` so that it is
stored (``Encoder.preprocessing`` after loading).
"""
from __future__ import annotations

import json
import logging
import re
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from clrjax import storage
from clrjax.models import DTYPES, build_encoder, resolve_model_config

FORMATS = ("orbax", "safetensors", "torch")
FORMAT_NAME = "clrjax-encoder"
FORMAT_VERSION = "1"
CONFIG_FILE = "model_config.json"
PREPROCESSING_FILE = "preprocessing.json"
ORBAX_DIR = "encoder"
SAFETENSORS_FILE = "encoder.safetensors"
TORCHVISION_FILE = "encoder_torchvision.pt"
TIMM_FILE = "encoder_timm.pt"


# ---------------------------------------------------------------------------
# Flat names
# ---------------------------------------------------------------------------

def _to_numpy(x: Any) -> np.ndarray:
    """Host copy of one array; gathers multi-host (non fully addressable) arrays first."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils  # only needed on multi-host runs
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def flatten_variables(variables: Mapping) -> Dict[str, np.ndarray]:
    """{'params': {'conv1': {'kernel': a}}} -> {'params/conv1/kernel': float32 ndarray}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(dict(variables))[0]:
        name = "/".join(str(k.key) for k in path)
        flat[name] = np.ascontiguousarray(_to_numpy(leaf), dtype=np.float32)
    return flat


def unflatten_variables(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Inverse of :func:`flatten_variables` (nested plain dicts)."""
    tree: Dict[str, Any] = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# ---------------------------------------------------------------------------
# torchvision / timm name mappings (numpy arrays; torch only to save)
# ---------------------------------------------------------------------------

# flax leaf name -> torch parameter/buffer name.
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias",
               "mean": "running_mean", "var": "running_var"}


def _torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
    """flax kernels -> torch: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def _convert(flat: Mapping[str, np.ndarray], module_name) -> Dict[str, np.ndarray]:
    """Renames every flat flax variable with ``module_name(parts) -> torch module path``."""
    out = {}
    for name, value in flat.items():
        _, *modules, leaf = name.split("/")  # drop the collection ('params' / 'batch_stats')
        key = ".".join(filter(None, [module_name(modules), _LEAF_NAMES.get(leaf, leaf)]))
        out[key] = np.ascontiguousarray(_torch_layout(leaf, value))
    return out


def _torchvision_module(modules: Sequence[str]) -> str:
    parts = []
    for part in modules:
        block = re.fullmatch(r"layer(\d)_(\d+)", part)
        if block:
            parts += [f"layer{block[1]}", block[2]]
        elif part == "downsample_conv":
            parts += ["downsample", "0"]
        elif part == "downsample_bn":
            parts += ["downsample", "1"]
        else:
            parts.append(part)
    return ".".join(parts)


def torchvision_arrays(encoder_variables: Mapping) -> Dict[str, np.ndarray]:
    """ResNet variables -> {torchvision state_dict key: numpy array}; see the module docstring.

    Adds ``num_batches_tracked`` (int64 0) for every BatchNorm, as
    torchvision's state_dict has it; it is unused in eval mode and when
    ``momentum`` is set.
    """
    out = _convert(flatten_variables(encoder_variables), _torchvision_module)
    for key in [k for k in out if k.endswith(".running_mean")]:
        out[key[: -len("running_mean")] + "num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out


def _timm_module(modules: Sequence[str]) -> str:
    parts = []
    for part in modules:
        block = re.fullmatch(r"blocks_(\d+)", part)
        if block:
            parts += ["blocks", block[1]]
        elif part == "patch_embed":
            parts += ["patch_embed", "proj"]
        else:
            parts.append(part)
    return ".".join(parts)


def timm_arrays(encoder_variables: Mapping) -> Dict[str, np.ndarray]:
    """ViT variables -> {timm VisionTransformer state_dict key: numpy array}; see the module docstring."""
    return _convert(flatten_variables(encoder_variables), _timm_module)


def _save_torch(arrays: Mapping[str, np.ndarray], path: str) -> None:
    try:
        import torch
    except ImportError as e:  # torch is an optional extra
        raise ImportError("export format 'torch' needs PyTorch: `pip install torch`, "
                          "or pass formats=('orbax', 'safetensors').") from e
    with storage.open(path, "wb") as f:
        torch.save({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, f)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------

def export_encoder(out_dir: str, model_cfg: Mapping, encoder_variables: Mapping,
                   formats: Sequence[str] = FORMATS,
                   preprocessing: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
    """Writes the encoder in the requested formats; returns {format: path written}.

    Args:
      out_dir: directory (created if needed; existing files are overwritten).
      model_cfg: the encoder config (validated, every default written out).
      encoder_variables: {'params': ..., 'batch_stats': ...} of the encoder.
      formats: subset of ('orbax', 'safetensors', 'torch'). 'torch' writes a
        torchvision state_dict for ResNets, a timm one for ViTs, and nothing
        for cnn_small (no torch counterpart; logged).
      preprocessing: optional JSON-serialisable description of the input
        the encoder expects (normalisation mean/std, image size, value range);
        stored, never applied.

    Multi-host: call it on every process (the Orbax save is collective);
    only process 0 writes the other files.
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"export format {unknown[0]!r} is unknown; use any of {', '.join(FORMATS)}.")
    cfg = resolve_model_config(model_cfg)
    out_dir = storage.absolute(out_dir)  # Orbax requires absolute paths (or gs:// URLs)
    storage.makedirs(out_dir)
    flat = flatten_variables(encoder_variables)
    primary = jax.process_index() == 0
    written = {}

    if primary:
        with storage.open(storage.join(out_dir, CONFIG_FILE), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
        written["config"] = storage.join(out_dir, CONFIG_FILE)
        if preprocessing is not None:
            with storage.open(storage.join(out_dir, PREPROCESSING_FILE), "w") as f:
                json.dump(dict(preprocessing), f, indent=2, sort_keys=True)
            written["preprocessing"] = storage.join(out_dir, PREPROCESSING_FILE)
    if "orbax" in formats:
        import orbax.checkpoint as ocp
        path = storage.join(out_dir, ORBAX_DIR)
        checkpointer = ocp.StandardCheckpointer()
        # Numpy leaves: restoring needs no mesh or sharding, on any device count.
        checkpointer.save(path, unflatten_variables(flat), force=True)
        checkpointer.wait_until_finished()
        written["orbax"] = path
    if "safetensors" in formats and primary:
        from safetensors.numpy import save
        path = storage.join(out_dir, SAFETENSORS_FILE)
        metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                    "model_config": json.dumps(cfg, sort_keys=True)}
        if preprocessing is not None:
            metadata["preprocessing"] = json.dumps(dict(preprocessing), sort_keys=True)
        storage.write_bytes(path, save(flat, metadata=metadata))
        written["safetensors"] = path
    if "torch" in formats and primary:
        if cfg["name"].startswith("resnet"):
            path = storage.join(out_dir, TORCHVISION_FILE)
            _save_torch(torchvision_arrays(encoder_variables), path)
            written["torch"] = path
        elif cfg["name"].startswith("vit"):
            path = storage.join(out_dir, TIMM_FILE)
            _save_torch(timm_arrays(encoder_variables), path)
            written["torch"] = path
        else:
            logging.info("export: %s has no torch counterpart; skipped the 'torch' format.", cfg["name"])
    return written


# ---------------------------------------------------------------------------
# Load
# ---------------------------------------------------------------------------

class Encoder:
    """A loaded encoder: ``encoder(images [B, H, W, C] float) -> float32 features [B, F]``.

    Runs in eval mode (BatchNorm running statistics), jitted once per input
    shape. Attributes: ``model_cfg`` (resolved dict), ``variables``
    (``{'params', 'batch_stats'}`` of jax arrays), ``module`` (the flax module),
    ``preprocessing`` (the dict given at export, or None; not applied).
    """

    def __init__(self, model_cfg: Mapping, variables: Mapping,
                 preprocessing: Optional[Mapping[str, Any]] = None):
        self.model_cfg = resolve_model_config(model_cfg)
        self.preprocessing = None if preprocessing is None else dict(preprocessing)
        self.variables = jax.tree.map(jnp.asarray, dict(variables))
        self.module = build_encoder(self.model_cfg)
        self._apply = jax.jit(lambda v, x: self.module.apply(v, x, train=False))

    def __call__(self, images) -> jax.Array:
        return self._apply(self.variables, jnp.asarray(images, jnp.float32))

    def __repr__(self) -> str:
        return f"Encoder({self.model_cfg})"


def _safetensors_metadata(data: bytes) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file: its header is an 8-byte little-endian length,
    then that many bytes of JSON (safetensors format description, huggingface/safetensors README)."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + length]).get("__metadata__") or {}


def _read_safetensors(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[Dict[str, Any]]]:
    from safetensors.numpy import load
    data = storage.read_bytes(path)
    metadata = _safetensors_metadata(data)
    if metadata.get("format") not in (FORMAT_NAME, IMAGE_TEXT_FORMAT) or "model_config" not in metadata:
        raise ValueError(f"{path} is not a clrjax encoder export (no '{FORMAT_NAME}' metadata); "
                         "export it with clrjax.export.export_encoder.")
    preprocessing = json.loads(metadata["preprocessing"]) if "preprocessing" in metadata else None
    variables = unflatten_variables(load(data))
    if metadata["format"] == IMAGE_TEXT_FORMAT:  # both towers in one file: the image encoder's part
        variables = _encoder_part(variables)
    return json.loads(metadata["model_config"]), variables, preprocessing


def _read_directory(path: str) -> Tuple[Dict[str, Any], Dict[str, Any], Optional[Dict[str, Any]]]:
    orbax_dir = storage.join(path, ORBAX_DIR)
    config_path = storage.join(path, CONFIG_FILE)
    if storage.isdir(orbax_dir) and storage.isfile(config_path):
        import orbax.checkpoint as ocp
        cfg = json.loads(storage.read_text(config_path))
        preprocessing = None
        if storage.isfile(storage.join(path, PREPROCESSING_FILE)):
            preprocessing = json.loads(storage.read_text(storage.join(path, PREPROCESSING_FILE)))
        return cfg, ocp.StandardCheckpointer().restore(orbax_dir), preprocessing
    if storage.isfile(storage.join(path, SAFETENSORS_FILE)):
        return _read_safetensors(storage.join(path, SAFETENSORS_FILE))
    raise ValueError(f"{path} holds neither {ORBAX_DIR}/ + {CONFIG_FILE} nor {SAFETENSORS_FILE}; "
                     "pass the directory written by export_encoder or its .safetensors file.")


def load_encoder(path: str, dtype: Optional[str] = "float32") -> Encoder:
    """Loads an export: the directory (Orbax + model_config.json, else its safetensors) or a .safetensors file.

    ``dtype`` is the compute dtype of the loaded encoder: ``'float32'``
    (default) or ``'bfloat16'``, or None for the one recorded in
    ``model_config.json`` (the training run's, ``bfloat16`` for the imagenet
    presets). The parameters are float32 either way; a bfloat16 forward pass
    is 0.4-1.3 % off the float32 one, so evaluation defaults to float32.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"load_encoder: dtype is {dtype!r}; use one of {', '.join(DTYPES)} "
                         "(or None for the dtype the export records).")
    path = storage.absolute(path)
    if storage.isdir(path):
        cfg, variables, preprocessing = _read_directory(path)
    elif path.endswith(".safetensors") and storage.isfile(path):
        cfg, variables, preprocessing = _read_safetensors(path)
    else:
        raise ValueError(f"{path} is neither an export directory nor a .safetensors file; "
                         "pass the out_dir given to export_encoder.")
    if dtype is not None:
        cfg = dict(cfg, dtype=dtype)
    return Encoder(cfg, variables, preprocessing)


# ---------------------------------------------------------------------------
# Image-text exports (clip, siglip): both towers, the tokenizer, the learned scalars
# ---------------------------------------------------------------------------

IMAGE_TEXT_FORMAT = "clrjax-image-text"
IMAGE_TEXT_FORMAT_VERSION = "1"
IMAGE_TEXT_FILE = "image_text.json"
IMAGE_TEXT_ORBAX_DIR = "image_text"
IMAGE_TEXT_SAFETENSORS_FILE = "image_text.safetensors"
TOKENIZER_DIR = "tokenizer"
VOCAB_TENSOR = "tokenizer/vocab_file"  # uint8 bytes of the vocabulary file, in image_text.safetensors
# What write_image_text_files adds to an encoder export (removed again by remove_image_text_files).
IMAGE_TEXT_FILES = (IMAGE_TEXT_FILE, IMAGE_TEXT_ORBAX_DIR, IMAGE_TEXT_SAFETENSORS_FILE, TOKENIZER_DIR)
# TwoTower modules kept beside the image encoder (clrjax/methods/image_text.py); the online 'probe' is not.
_TOWER_MODULES = ("image_projection", "text_encoder", "text_projection")
# Packages the vocabulary-file tokenizers need (clrjax/data/tokenizers.py).
_TOKENIZER_PACKAGES = {"sentencepiece": "sentencepiece", "bpe": "tokenizers"}


def text_tower_config(tower) -> Dict[str, Any]:
    """Every field of a :class:`clrjax.models.text.TextTransformer`, dtype by name: what rebuilds it."""
    import dataclasses

    out = {}
    for field in dataclasses.fields(tower):
        if field.name in ("parent", "name"):  # flax bookkeeping, not configuration
            continue
        value = getattr(tower, field.name)
        out[field.name] = jnp.dtype(value).name if field.name == "dtype" else value
    return out


def tokenizer_record(tokenizer) -> Dict[str, Any]:
    """The tokenizer's ``settings()`` (kind, vocab_file, context_length) plus its special ids and size."""
    record = dict(tokenizer.settings())
    record.update(vocab_size=int(tokenizer.vocab_size), pad_id=int(tokenizer.pad_id),
                  sot_id=int(tokenizer.sot_id), eot_id=int(tokenizer.eot_id))
    return record


def two_tower_variables(variables: Mapping) -> Dict[str, Any]:
    """What an image-text export keeps of a TwoTower's variables: both towers, projections, scalars.

    ``{'params': {'encoder', 'image_projection' (if any), 'text_encoder', 'text_projection',
    <scalars>}, 'batch_stats': {'encoder'}}``; the online probe is dropped. The scalars are the
    parameters that are arrays, not modules: CLIP's 'logit_scale', SigLIP's 'log_t' and 'bias'.
    """
    params = variables.get("params") or {}
    missing = [name for name in ("encoder", "text_encoder", "text_projection") if name not in params]
    if missing:
        raise ValueError(f"the variables have no {missing[0]!r} module, so they are not a two-tower model; pass "
                         "the variables of a clip or siglip run (clrjax/methods/image_text.py TwoTower).")
    kept = {k: v for k, v in params.items()
            if k == "encoder" or k in _TOWER_MODULES or not isinstance(v, Mapping)}
    out = {"params": kept}
    stats = (variables.get("batch_stats") or {}).get("encoder")
    if stats:
        out["batch_stats"] = {"encoder": stats}
    return out


def _encoder_part(variables: Mapping) -> Dict[str, Any]:
    """{'params', 'batch_stats'} of the image encoder inside two-tower variables."""
    out = {"params": variables["params"]["encoder"]}
    stats = (variables.get("batch_stats") or {}).get("encoder")
    if stats:
        out["batch_stats"] = stats
    return out


def _scalars_of(variables: Mapping) -> Dict[str, float]:
    return {k: float(_to_numpy(v)) for k, v in variables["params"].items() if not isinstance(v, Mapping)}


def _vocab_copy(record: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[bytes]]:
    """(the record as the export stores it, the vocabulary bytes): the file is renamed into tokenizer/."""
    import hashlib
    import os

    source = record.get("vocab_file") or ""
    if not source:
        return dict(record, vocab_file=""), None
    data = storage.read_bytes(source)
    stored = dict(record, vocab_file=f"{TOKENIZER_DIR}/{os.path.basename(source)}",
                  vocab_sha256=hashlib.sha256(data).hexdigest())
    return stored, data


def remove_image_text_files(out_dir: str) -> None:
    """Removes what :func:`write_image_text_files` wrote into ``out_dir`` (no error if absent)."""
    for name in IMAGE_TEXT_FILES:
        target = storage.join(out_dir, name)
        if storage.isdir(target):
            storage.rmtree(target)
        elif storage.exists(target):
            storage.remove(target)


def write_image_text_files(out_dir: str, model_cfg: Mapping, model, variables: Mapping, tokenizer, *,
                           method: str, augment: Optional[Mapping[str, Any]] = None,
                           preprocessing: Optional[Mapping[str, Any]] = None,
                           formats: Sequence[str] = ("orbax", "safetensors")) -> Dict[str, str]:
    """Adds the text side of a two-tower model to an encoder export in ``out_dir``; returns {what: path}.

    Writes ``image_text.json`` (method, joint dimension, every text tower field, the tokenizer
    settings and ids, the learned scalars, the run's augment config), ``tokenizer/<file>`` (a copy
    of the vocabulary file; none for the byte tokenizer), and per format: 'orbax' ->
    ``image_text/`` (every variable but the image encoder's, which is ``encoder/``), 'safetensors'
    -> ``image_text.safetensors`` (all of them, the vocabulary bytes and the JSON: one
    self-contained file). 'torch' adds nothing (the text tower has no torch format here).

    Args:
      model_cfg: the image encoder config (as for :func:`export_encoder`).
      model: the :class:`clrjax.methods.image_text.TwoTower` (read: ``text_encoder``, ``embed_dim``,
        ``project_image``).
      variables: its variables (:func:`two_tower_variables` picks what is kept).
      tokenizer: the run's tokenizer (:func:`clrjax.data.tokenizers.get_tokenizer`) or any object
        with its ``settings()``, ``vocab_size`` and ``pad_id``/``sot_id``/``eot_id``.
      method: the method name ('clip', 'siglip'), recorded.
      augment: the run's ``config.augment`` (dict); with it ``encode_image`` takes uint8 images.
      preprocessing: as for :func:`export_encoder` (into the safetensors metadata).
    """
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"export format {unknown[0]!r} is unknown; use any of {', '.join(FORMATS)}.")
    kept = two_tower_variables(variables)
    out_dir = storage.absolute(out_dir)
    storage.makedirs(out_dir)
    record, vocab = _vocab_copy(tokenizer_record(tokenizer))
    settings = {"format": IMAGE_TEXT_FORMAT, "format_version": IMAGE_TEXT_FORMAT_VERSION, "method": str(method),
                "embed_dim": int(model.embed_dim), "image_projection": bool(model.project_image),
                "text_tower": text_tower_config(model.text_encoder), "tokenizer": record,
                "scalars": _scalars_of(kept), "augment": None if augment is None else _plain(augment)}
    flat = flatten_variables(kept)
    primary = jax.process_index() == 0
    written = {}
    if primary:
        with storage.open(storage.join(out_dir, IMAGE_TEXT_FILE), "w") as f:
            json.dump(settings, f, indent=2, sort_keys=True)
        written["image_text"] = storage.join(out_dir, IMAGE_TEXT_FILE)
        if vocab is not None:
            storage.makedirs(storage.join(out_dir, TOKENIZER_DIR))
            storage.write_bytes(storage.join(out_dir, record["vocab_file"]), vocab)
            written["tokenizer"] = storage.join(out_dir, record["vocab_file"])
    if "orbax" in formats:
        import orbax.checkpoint as ocp
        path = storage.join(out_dir, IMAGE_TEXT_ORBAX_DIR)
        rest = {k: v for k, v in flat.items() if not k.startswith(("params/encoder/", "batch_stats/encoder/"))}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, unflatten_variables(rest), force=True)
        checkpointer.wait_until_finished()
        written["image_text_orbax"] = path
    if "safetensors" in formats and primary:
        from safetensors.numpy import save
        path = storage.join(out_dir, IMAGE_TEXT_SAFETENSORS_FILE)
        arrays = dict(flat)
        if vocab is not None:
            arrays[VOCAB_TENSOR] = np.frombuffer(vocab, np.uint8).copy()
        metadata = {"format": IMAGE_TEXT_FORMAT, "format_version": IMAGE_TEXT_FORMAT_VERSION,
                    "model_config": json.dumps(resolve_model_config(model_cfg), sort_keys=True),
                    "image_text": json.dumps(settings, sort_keys=True)}
        if preprocessing is not None:
            metadata["preprocessing"] = json.dumps(dict(preprocessing), sort_keys=True)
        storage.write_bytes(path, save(arrays, metadata=metadata))
        written["image_text_safetensors"] = path
    return written


def export_image_text(out_dir: str, model_cfg: Mapping, model, variables: Mapping, tokenizer, *, method: str,
                      augment: Optional[Mapping[str, Any]] = None,
                      preprocessing: Optional[Mapping[str, Any]] = None,
                      formats: Sequence[str] = FORMATS) -> Dict[str, str]:
    """:func:`export_encoder` of the image encoder plus :func:`write_image_text_files`: a whole two-tower export.

    ``load_encoder(out_dir)`` then gives the image backbone's features, as for any export, and
    :func:`load_image_text` both towers' joint-space embeddings.
    """
    written = export_encoder(out_dir, model_cfg, _encoder_part(two_tower_variables(variables)), formats,
                             preprocessing)
    written.update(write_image_text_files(out_dir, model_cfg, model, variables, tokenizer, method=method,
                                          augment=augment, preprocessing=preprocessing, formats=formats))
    return written


def _plain(value):
    """JSON-able copy of a (Config)dict: tuples as lists, nested dicts as dicts."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


# ---------------------------------------------------------------------------
# Loading an image-text export
# ---------------------------------------------------------------------------

def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _bucket(n: int, batch_size: int) -> int:
    """Rows per compiled call: the next power of two up to ``batch_size`` (few shapes, little padding)."""
    return min(batch_size, 1 << max(n - 1, 0).bit_length())


class ImageText:
    """A loaded image-text export: ``encode_image`` and ``encode_text`` -> joint-space embeddings.

    Both return float32 numpy ``[n, embed_dim]``, **L2-normalised** by default
    (``normalize=False``: the raw projections, what the loss normalises), computed as in
    training: image encoder in inference mode, then ``h @ image_projection`` (no bias);
    text tower (pooled at the end-of-text token, or the mean for 'mean' pooling), then
    ``@ text_projection``. Attributes: ``method`` ('clip' / 'siglip'), ``embed_dim``,
    ``logit_scale`` (the learned logarithm of the logit multiplier: CLIP's 'logit_scale',
    SigLIP's 'log_t'), ``scale`` (the multiplier the loss used: CLIP exp(min(logit_scale,
    log 100)), SigLIP exp(log_t)), ``bias`` (SigLIP's b; None for CLIP), ``scalars`` (every
    learned scalar by name), ``tokenizer`` (rebuilt from the export), ``context_length``,
    ``model_cfg`` / ``text_cfg`` (the towers' configs), ``variables`` (TwoTower layout, no probe),
    ``preprocessing``.
    """

    def __init__(self, model_cfg: Mapping, variables: Mapping, settings: Mapping, tokenizer,
                 preprocessing: Optional[Mapping[str, Any]] = None):
        from clrjax.losses.clip import MAX_LOGIT_SCALE
        from clrjax.models import text

        self.model_cfg = resolve_model_config(model_cfg)
        self.settings = dict(settings)
        self.method = settings["method"]
        self.embed_dim = int(settings["embed_dim"])
        self.text_cfg = dict(settings["text_tower"])
        self.tokenizer = tokenizer
        self.context_length = int(settings["tokenizer"]["context_length"])
        self.preprocessing = None if preprocessing is None else dict(preprocessing)
        self.augment = settings.get("augment")
        self.scalars = {k: float(v) for k, v in settings["scalars"].items()}
        if "logit_scale" in self.scalars:  # CLIP: the multiplier is capped at 100 (clrjax/losses/clip.py)
            self.logit_scale = self.scalars["logit_scale"]
            self.scale = float(np.exp(min(self.logit_scale, MAX_LOGIT_SCALE)))
        else:  # SigLIP: t = exp(log_t) (clrjax/losses/siglip.py)
            self.logit_scale = self.scalars["log_t"]
            self.scale = float(np.exp(self.logit_scale))
        self.bias = self.scalars.get("bias")
        self.variables = jax.tree.map(jnp.asarray, dict(variables))
        self.image_module = build_encoder(self.model_cfg)
        self.text_module = text.build_text_tower(self.text_cfg)
        self._images = jax.jit(self._image_embeddings, static_argnames=("preprocess", "normalize"))
        self._tokens = jax.jit(self._text_embeddings, static_argnames=("normalize",))

    # -- the towers (jitted) --

    def _image_embeddings(self, variables, images, preprocess: bool, normalize: bool):
        from clrjax.data import augment

        x = augment.preprocess_eval(images, self.augment) if preprocess else images.astype(jnp.float32)
        h = self.image_module.apply(_encoder_part(variables), x, train=False).astype(jnp.float32)
        if "image_projection" in variables["params"]:
            h = h @ variables["params"]["image_projection"]["kernel"]
        return _unit(h) if normalize else h

    def _text_embeddings(self, variables, tokens, normalize: bool):
        features = self.text_module.apply({"params": variables["params"]["text_encoder"]}, tokens)
        z = features.astype(jnp.float32) @ variables["params"]["text_projection"]["kernel"]
        return _unit(z) if normalize else z

    def _batched(self, fn, rows: np.ndarray, batch_size: int) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, self.embed_dim), np.float32)
        out = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            size = _bucket(len(chunk), batch_size)
            # padding rows repeat the last one: both towers are row-independent in inference mode
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], size - len(chunk), axis=0)])
            out.append(np.asarray(fn(padded))[:len(chunk)])
        return np.concatenate(out)

    # -- public --

    def encode_image(self, images, normalize: bool = True, batch_size: int = 256) -> np.ndarray:
        """Images -> float32 [n, embed_dim] (unit rows unless ``normalize=False``).

        uint8 ``[n, H, W, C]``: the run's evaluation preprocessing is applied (centre square
        crop, resize to the training crop size, /255, per-channel mean/std; clrjax.data.augment
        ``preprocess_eval``). Float images are taken as already preprocessed ``[n, S, S, C]``.
        """
        images = np.asarray(images)
        preprocess = images.dtype == np.uint8
        if preprocess and not self.augment:
            raise ValueError("encode_image: this export records no augment config, so uint8 images cannot be "
                             "preprocessed; pass float images preprocessed as preprocessing.json says.")
        if images.ndim != 4:
            raise ValueError(f"encode_image: images must be [n, H, W, C], got shape {images.shape}.")
        return self._batched(lambda x: self._images(self.variables, x, preprocess=preprocess, normalize=normalize),
                             images, batch_size)

    def tokenize(self, texts) -> np.ndarray:
        """int32 [n, context_length]: the export's tokenizer, cut and padded as in training."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.tokenizer.encode_batch(texts, self.context_length)

    def encode_tokens(self, tokens, normalize: bool = True, batch_size: int = 256) -> np.ndarray:
        """int32 tokens [n, L] (L <= context_length) -> float32 [n, embed_dim]."""
        tokens = np.asarray(tokens, np.int32)
        return self._batched(lambda t: self._tokens(self.variables, t, normalize=normalize), tokens, batch_size)

    def encode_text(self, texts, normalize: bool = True, batch_size: int = 256) -> np.ndarray:
        """A string or a list of strings -> float32 [n, embed_dim], tokenized on the host (:meth:`tokenize`)."""
        return self.encode_tokens(self.tokenize(texts), normalize, batch_size)

    def logits(self, image_embeddings, text_embeddings) -> np.ndarray:
        """[n_images, n_texts] logits of the training loss: ``scale * cos + bias`` (no bias for CLIP)."""
        u = np.asarray(_unit(jnp.asarray(image_embeddings, jnp.float32)))
        v = np.asarray(_unit(jnp.asarray(text_embeddings, jnp.float32)))
        return self.scale * (u @ v.T) + (self.bias or 0.0)

    def __repr__(self) -> str:
        return (f"ImageText({self.method}, image {self.model_cfg['name']}, text {self.text_cfg['width']}x"
                f"{self.text_cfg['layers']}, {self.settings['tokenizer']['tokenizer']} tokenizer, "
                f"embed_dim {self.embed_dim})")


def _not_image_text(path: str) -> ValueError:
    return ValueError(f"load_image_text: {path} is an image-encoder export without a text tower (no "
                      f"{IMAGE_TEXT_FILE}); load its encoder with clrjax.export.load_encoder, or export a clip or "
                      f"siglip run with experiments/export.py to get both towers.")


def _check_settings(settings: Mapping, path: str) -> None:
    if settings.get("format") != IMAGE_TEXT_FORMAT:
        raise ValueError(f"load_image_text: {path} is not a clrjax image-text export (format "
                         f"{settings.get('format')!r}, not {IMAGE_TEXT_FORMAT!r}).")
    if str(settings.get("format_version")) != IMAGE_TEXT_FORMAT_VERSION:
        raise ValueError(f"load_image_text: {path} has image-text format version {settings.get('format_version')}; "
                         f"this clrjax reads version {IMAGE_TEXT_FORMAT_VERSION}: re-export the run.")


def _rebuild_tokenizer(record: Mapping, vocab: Optional[bytes], where: str):
    """The export's tokenizer from its record and vocabulary bytes, its ids checked against the record."""
    import hashlib
    import importlib.util
    import os
    import tempfile

    from clrjax.data import tokenizers

    kind = record["tokenizer"]
    settings = {"tokenizer": kind, "context_length": int(record["context_length"]), "vocab_file": ""}
    if kind != "bytes":
        if vocab is None:
            raise ValueError(f"load_image_text: {where} has no vocabulary file for its {kind!r} tokenizer "
                             f"({record.get('vocab_file')!r} is missing); re-export the run.")
        if hashlib.sha256(vocab).hexdigest() != record.get("vocab_sha256"):
            raise ValueError(f"load_image_text: the vocabulary file of {where} ({record.get('vocab_file')}) differs "
                             "from the one exported (sha256 mismatch); restore it or re-export the run.")
        package = _TOKENIZER_PACKAGES[kind]
        if importlib.util.find_spec(package) is None:
            raise ValueError(f"load_image_text: this export's tokenizer is {kind!r}, which needs the {package} "
                             f"package: pip install {package}.")
    with tempfile.TemporaryDirectory(prefix="clrjax-vocab-") as scratch:
        if vocab is not None:  # the libraries read local files; the copy lives only while they load it
            settings["vocab_file"] = os.path.join(scratch, os.path.basename(record["vocab_file"]))
            with open(settings["vocab_file"], "wb") as f:
                f.write(vocab)
        try:
            tokenizer = tokenizers.get_tokenizer(settings)
        except tokenizers.TokenizerError as err:  # its message names config fields, which do not apply here
            raise ValueError(f"load_image_text: the {kind} vocabulary of {where} cannot be read ({err}); "
                             "re-export the run.") from None
    for key in ("vocab_size", "pad_id", "sot_id", "eot_id"):
        if key in record and int(getattr(tokenizer, key)) != int(record[key]):
            raise ValueError(f"load_image_text: the tokenizer rebuilt from {where} has {key}="
                             f"{getattr(tokenizer, key)} but the export recorded {record[key]}; the tokenizer "
                             "library reads the vocabulary differently: use the version that trained the run.")
    return tokenizer


def _image_text_from_safetensors(path: str):
    from safetensors.numpy import load
    data = storage.read_bytes(path)
    metadata = _safetensors_metadata(data)
    if metadata.get("format") == FORMAT_NAME:
        raise _not_image_text(path)
    if metadata.get("format") != IMAGE_TEXT_FORMAT or "image_text" not in metadata:
        raise ValueError(f"load_image_text: {path} is not a clrjax image-text export (no '{IMAGE_TEXT_FORMAT}' "
                         "metadata); pass the image_text.safetensors or the directory experiments/export.py wrote.")
    settings = json.loads(metadata["image_text"])
    _check_settings(settings, path)
    arrays = load(data)
    vocab = arrays.pop(VOCAB_TENSOR, None)
    preprocessing = json.loads(metadata["preprocessing"]) if "preprocessing" in metadata else None
    return (json.loads(metadata["model_config"]), unflatten_variables(arrays), settings,
            None if vocab is None else vocab.tobytes(), preprocessing)


def _image_text_from_directory(path: str):
    settings_path = storage.join(path, IMAGE_TEXT_FILE)
    if not storage.isfile(settings_path):
        if storage.isfile(storage.join(path, IMAGE_TEXT_SAFETENSORS_FILE)):
            return _image_text_from_safetensors(storage.join(path, IMAGE_TEXT_SAFETENSORS_FILE))
        if storage.isfile(storage.join(path, CONFIG_FILE)) or storage.isfile(storage.join(path, SAFETENSORS_FILE)):
            raise _not_image_text(path)
        raise ValueError(f"load_image_text: {path} holds no {IMAGE_TEXT_FILE}, so it is not an image-text export; "
                         "pass the --out of experiments/export.py for a clip or siglip run.")
    settings = json.loads(storage.read_text(settings_path))
    _check_settings(settings, path)
    if not (storage.isdir(storage.join(path, IMAGE_TEXT_ORBAX_DIR)) and storage.isdir(storage.join(path, ORBAX_DIR))):
        if storage.isfile(storage.join(path, IMAGE_TEXT_SAFETENSORS_FILE)):
            return _image_text_from_safetensors(storage.join(path, IMAGE_TEXT_SAFETENSORS_FILE))
        raise ValueError(f"load_image_text: {path} has {IMAGE_TEXT_FILE} but neither {IMAGE_TEXT_ORBAX_DIR}/ with "
                         f"{ORBAX_DIR}/ nor {IMAGE_TEXT_SAFETENSORS_FILE}; re-export the run with experiments/export.py.")
    import orbax.checkpoint as ocp
    model_cfg, encoder, preprocessing = _read_directory(path)
    rest = ocp.StandardCheckpointer().restore(storage.join(path, IMAGE_TEXT_ORBAX_DIR))
    variables = {"params": dict(rest["params"], encoder=encoder["params"])}
    if encoder.get("batch_stats"):
        variables["batch_stats"] = {"encoder": encoder["batch_stats"]}
    record = settings["tokenizer"]
    vocab = None
    if record.get("vocab_file"):
        file = storage.join(path, record["vocab_file"])
        vocab = storage.read_bytes(file) if storage.isfile(file) else None
    return model_cfg, variables, settings, vocab, preprocessing


def load_image_text(path: str, dtype: Optional[str] = "float32") -> ImageText:
    """Loads an image-text export: its directory (Orbax) or its ``image_text.safetensors``.

    ``dtype``: the compute dtype of both towers, float32 by default (as :func:`load_encoder`;
    None: the recorded ones). The tokenizer is rebuilt from the export's own copy of the
    vocabulary, whose sha256 is checked; an export without a text tower (an image encoder
    export) raises ValueError naming :func:`load_encoder`.
    """
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"load_image_text: dtype is {dtype!r}; use one of {', '.join(DTYPES)} "
                         "(or None for the dtypes the export records).")
    path = storage.absolute(path)
    if storage.isdir(path):
        model_cfg, variables, settings, vocab, preprocessing = _image_text_from_directory(path)
    elif path.endswith(".safetensors") and storage.isfile(path):
        model_cfg, variables, settings, vocab, preprocessing = _image_text_from_safetensors(path)
    else:
        raise ValueError(f"load_image_text: {path} is neither an export directory nor a .safetensors file; pass "
                         "the --out of experiments/export.py for a clip or siglip run.")
    tokenizer = _rebuild_tokenizer(settings["tokenizer"], vocab, path)
    if dtype is not None:
        model_cfg = dict(model_cfg, dtype=dtype)
        settings = dict(settings, text_tower=dict(settings["text_tower"], dtype=dtype))
    return ImageText(model_cfg, variables, settings, tokenizer, preprocessing)
