"""Export formats: round trips, and the torchvision / timm state_dicts against PyTorch.

The PyTorch references below are written from torchvision.models.resnet and
timm.models.vision_transformer (same module names, same forward), so a
state_dict that loads into them with only fc.* / head.* missing loads into the
real libraries too. They are independent implementations of the math: a match
to 1e-4 checks padding, strides, BN eps, layouts and the qkv order.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.export import (FORMATS, export_encoder, flatten_variables, load_encoder, timm_arrays,
                           torchvision_arrays)
from clrjax.models import build_encoder
from clrjax.models.vit import ViT


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def doc_snippet(name):
    """The ```python block after ``<!-- snippet:NAME -->`` in docs/EVALUATION.md, verbatim."""
    import re
    with open(os.path.join(ROOT, "docs", "EVALUATION.md")) as f:
        text = f.read()
    start = text.index(f"<!-- snippet:{name} -->")
    return re.match(r"\s*```python\n(.*?)```", text[start + len(f"<!-- snippet:{name} -->"):], re.S).group(1)


def random_variables(module, x, seed=0):
    """Variables of ``module`` filled with random values (no init compile): fan-in scaled
    kernels, non-trivial BN statistics and affine parameters."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        leaf = path[-1].key
        if leaf == "var":
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        if leaf == "scale":
            return rng.uniform(0.5, 1.0, s.shape).astype(np.float32)
        if leaf == "kernel":
            return (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
        return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def features(module, variables, x):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, x))


# ---------------------------------------------------------------------------
# Round trips (cnn_small: fast; the ResNet path is exercised below)
# ---------------------------------------------------------------------------

PREPROCESSING = {"mean": [0.5], "std": [0.25], "image_size": 12}


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    cfg = {"name": "cnn_small", "widths": [4, 8, 8], "stem_stride": 2}
    module = build_encoder(cfg)
    x = jax.random.normal(jax.random.key(0), (3, 12, 12, 1))
    variables = random_variables(module, x)
    out_dir = tmp_path_factory.mktemp("export")
    written = export_encoder(str(out_dir), cfg, variables, preprocessing=PREPROCESSING)
    return cfg, variables, x, features(module, variables, x), out_dir, written


def test_cnn_export_writes_documented_files(cnn_export):
    cfg, variables, _, _, out_dir, written = cnn_export
    assert set(written) == {"config", "preprocessing", "orbax", "safetensors"}  # no torch for cnn_small
    saved_cfg = json.loads((out_dir / "model_config.json").read_text())
    assert saved_cfg == {"name": "cnn_small", "dtype": "float32", "widths": [4, 8, 8], "stem_stride": 2}
    from safetensors import safe_open
    with safe_open(str(out_dir / "encoder.safetensors"), framework="numpy") as f:
        assert sorted(f.keys()) == sorted(flatten_variables(variables))
        assert "params/conv_0/kernel" in f.keys() and "batch_stats/bn_2/var" in f.keys()
        assert json.loads(f.metadata()["model_config"]) == saved_cfg
        assert f.get_tensor("params/conv_0/kernel").dtype == np.float32


@pytest.mark.parametrize("where", ["directory", "safetensors_file", "directory_without_orbax"])
def test_round_trip_same_features(cnn_export, where, tmp_path):
    cfg, variables, x, expected, out_dir, _ = cnn_export
    if where == "directory":
        path = out_dir
    elif where == "safetensors_file":
        path = out_dir / "encoder.safetensors"
    else:
        export_encoder(str(tmp_path), cfg, variables, formats=("safetensors",), preprocessing=PREPROCESSING)
        assert not (tmp_path / "encoder").exists()
        path = tmp_path
    encoder = load_encoder(str(path))
    assert encoder.model_cfg["name"] == "cnn_small" and encoder.preprocessing == PREPROCESSING
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), encoder.variables, variables)
    np.testing.assert_allclose(np.asarray(encoder(x)), expected, rtol=1e-6, atol=1e-6)


def test_export_from_ssl_model_with_replicated_arrays(tmp_path):
    # The trainer's path: SSLModel variables, replicated over the 8 simulated devices.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    from clrjax.models import build_ssl_model, encoder_variables
    cfg = {"name": "cnn_small", "widths": [4, 8]}
    model = build_ssl_model(cfg, {"hidden_dims": [8], "out_dim": 4, "use_bn": True, "last_bn": False}, num_classes=3)
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    variables = jax.device_put(random_variables(model, x), NamedSharding(mesh, PartitionSpec()))
    expected = jax.jit(lambda v, x: model.apply(v, x, method=model.encode))(variables, x)
    export_encoder(str(tmp_path), cfg, encoder_variables(variables), formats=("orbax", "safetensors"))
    loaded = load_encoder(str(tmp_path))
    assert loaded.preprocessing is None  # none given at export
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(expected), rtol=1e-6, atol=1e-6)


def test_export_errors(tmp_path, cnn_export):
    cfg, variables, *_ = cnn_export
    with pytest.raises(ValueError, match="export format 'onnx' is unknown"):
        export_encoder(str(tmp_path), cfg, variables, formats=("onnx",))
    with pytest.raises(ValueError, match="neither"):
        load_encoder(str(tmp_path))
    assert FORMATS == ("orbax", "safetensors", "torch")


def test_load_encoder_computes_in_float32_unless_asked(tmp_path):
    # A bfloat16 run's export (the imagenet presets record dtype bfloat16).
    cfg = {"name": "cnn_small", "widths": [4, 8], "dtype": "bfloat16"}
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 1)).astype(np.float32)
    variables = random_variables(build_encoder(cfg), x)
    export_encoder(str(tmp_path), cfg, variables, formats=("safetensors",))
    float32 = load_encoder(str(tmp_path))
    assert float32.model_cfg["dtype"] == "float32"
    expected = features(build_encoder(dict(cfg, dtype="float32")), variables, x)
    np.testing.assert_allclose(np.asarray(float32(x)), expected, rtol=1e-6, atol=1e-6)
    recorded = load_encoder(str(tmp_path), dtype=None)
    assert recorded.model_cfg["dtype"] == "bfloat16" == load_encoder(str(tmp_path), dtype="bfloat16").model_cfg["dtype"]
    assert not np.allclose(np.asarray(recorded(x)), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="dtype is 'float16'; use one of float32, bfloat16"):
        load_encoder(str(tmp_path), dtype="float16")


def test_docs_readme_and_docstring_show_the_same_torch_snippets():
    """The tested blocks of docs/EVALUATION.md are the ones README.md and clrjax/export.py show."""
    import textwrap
    import clrjax.export
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    torchvision_snippet, timm_snippet = doc_snippet("torchvision"), doc_snippet("timm")
    assert "model.eval()" in torchvision_snippet and "Normalize(pre[\"mean\"], pre[\"std\"])" in torchvision_snippet
    assert f"```python\n{torchvision_snippet}```" in readme
    for snippet in (torchvision_snippet, timm_snippet):
        assert textwrap.indent(snippet, "    ") in clrjax.export.__doc__


# ---------------------------------------------------------------------------
# PyTorch references with torchvision / timm structure and names
# ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")
tnn = torch.nn


class BasicBlock(tnn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.relu = tnn.ReLU(inplace=True)
        self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = tnn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(tnn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = tnn.BatchNorm2d(planes)
        self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = tnn.BatchNorm2d(planes)
        self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = tnn.BatchNorm2d(planes * 4)
        self.relu = tnn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchResNet(tnn.Module):
    """torchvision.models.resnet.ResNet, with the CIFAR-stem swap documented in clrjax.export."""

    def __init__(self, block, layers, cifar_stem=False, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = tnn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = tnn.BatchNorm2d(64)
        self.relu = tnn.ReLU(inplace=True)
        self.maxpool = tnn.MaxPool2d(3, 2, 1)
        if cifar_stem:
            self.conv1 = tnn.Conv2d(3, 64, 3, 1, 1, bias=False)
            self.maxpool = tnn.Identity()
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
        self.fc = tnn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = tnn.Sequential(
                tnn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                tnn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return tnn.Sequential(*layers)

    def features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


TORCH_RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def load_into_torch(torch_model, arrays):
    state_dict = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    missing, unexpected = torch_model.load_state_dict(state_dict, strict=False)
    return missing, unexpected


def check_resnet_against_torch(name, cifar_stem, size, tmp_path):
    cfg = {"name": name, "cifar_stem": cifar_stem}
    module = build_encoder(cfg)
    x = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    variables = random_variables(module, x)
    written = export_encoder(str(tmp_path), cfg, variables, formats=("torch",))
    state_dict = torch.load(written["torch"])
    assert os.path.basename(written["torch"]) == "encoder_torchvision.pt"

    block, layers = TORCH_RESNETS[name]
    torch_model = TorchResNet(block, layers, cifar_stem=cifar_stem).eval()
    missing, unexpected = torch_model.load_state_dict(state_dict, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert len(state_dict) == len(torch_model.state_dict()) - 2  # every backbone tensor, incl. buffers
    with torch.no_grad():
        expected = torch_model.features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    got = features(module, variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_resnet18_matches_torchvision_structure(tmp_path):
    check_resnet_against_torch("resnet18", cifar_stem=False, size=64, tmp_path=tmp_path)


def test_resnet18_cifar_stem_matches_documented_torch_swap(tmp_path):
    check_resnet_against_torch("resnet18", cifar_stem=True, size=16, tmp_path=tmp_path)


# ~9 s on 2 busy CPU cores (mostly the ResNet-50 compile), so it stays in the default run.
def test_resnet50_matches_torchvision_structure(tmp_path):
    check_resnet_against_torch("resnet50", cifar_stem=False, size=32, tmp_path=tmp_path)


def test_resnet50_state_dict_names_and_shapes_match_torchvision():
    # Shape-only (eval_shape; no compile): every torchvision resnet50 backbone key, same shapes.
    module = build_encoder({"name": "resnet50"})
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False))
    arrays = torchvision_arrays(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes))
    reference = TorchResNet(Bottleneck, [3, 4, 6, 3]).state_dict()
    assert sorted(arrays) == sorted(k for k in reference if not k.startswith("fc."))
    for key, value in arrays.items():
        assert tuple(value.shape) == tuple(reference[key].shape), key


class TimmAttention(tnn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = tnn.Linear(dim, dim * 3)
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class TimmMlp(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), tnn.GELU(), tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TimmBlock(tnn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1, self.attn = tnn.LayerNorm(dim, eps=1e-6), TimmAttention(dim, num_heads)
        self.norm2, self.mlp = tnn.LayerNorm(dim, eps=1e-6), TimmMlp(dim, 4 * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TimmPatchEmbed(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = tnn.Conv2d(3, dim, 16, 16)


class TimmViT(tnn.Module):
    """timm VisionTransformer (class token, no pre-norm, final norm, cls pooling)."""

    def __init__(self, dim, depth, num_heads, num_patches, num_classes=1000):
        super().__init__()
        self.patch_embed = TimmPatchEmbed(dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = tnn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = tnn.Sequential(*[TimmBlock(dim, num_heads) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)
        self.head = tnn.Linear(dim, num_classes)

    def features(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


def test_vit_matches_timm_structure():
    dim, depth, heads, size = 24, 2, 3, 32
    module = ViT(dim=dim, depth=depth, num_heads=heads)
    x = np.random.default_rng(1).standard_normal((2, size, size, 3)).astype(np.float32)
    variables = random_variables(module, x)
    torch_model = TimmViT(dim, depth, heads, num_patches=(size // 16) ** 2).eval()
    missing, unexpected = load_into_torch(torch_model, timm_arrays(variables))
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    with torch.no_grad():
        expected = torch_model.features(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(features(module, variables, x), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())


def test_vit_export_writes_timm_file(tmp_path):
    # Registered ViT-Tiny: names and shapes of timm's vit_tiny_patch16_224 at 224x224.
    cfg = {"name": "vit_tiny"}
    module = build_encoder(cfg)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
    written = export_encoder(str(tmp_path), cfg, variables, formats=("torch",))
    state_dict = torch.load(written["torch"])
    reference = TimmViT(192, 12, 3, num_patches=196).state_dict()
    assert sorted(state_dict) == sorted(k for k in reference if not k.startswith("head."))
    for key, value in state_dict.items():
        assert tuple(value.shape) == tuple(reference[key].shape), key


# ---------------------------------------------------------------------------
# The loading snippets of docs/EVALUATION.md, executed as written
# ---------------------------------------------------------------------------

def import_or_skip(name):
    """pytest.importorskip that also skips a package that is installed but fails to import
    (PyPI's torchvision beside a CPU torch: 'operator torchvision::nms does not exist')."""
    try:
        return __import__(name)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"{name} is not importable ({type(err).__name__}: {err}); the docs snippet needs it")


def run_snippet(snippet, export_dir, tmp_path, monkeypatch, cfg, variables, image, preprocessing):
    """Writes the export to the path the snippet names and its image.png, runs the snippet in
    tmp_path; returns its namespace."""
    from PIL import Image
    import re
    path = tmp_path / re.search(r'export = "([^"]+)"', snippet).group(1)
    export_encoder(str(path), cfg, variables, preprocessing=preprocessing)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp_path / "image.png")
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(snippet, "docs/EVALUATION.md", "exec"), namespace)
    return namespace


def snippet_inputs(module, size, channels, seed=0):
    """A random uint8 image, its preprocessing record, the clrjax input and random variables."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size, channels), dtype=np.uint8)
    mean, std = [0.3, 0.4, 0.5][:channels], [0.2, 0.25, 0.3][:channels]
    x = ((image.astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std))[None]
    return image, {"mean": mean, "std": std, "image_size": size}, x, random_variables(module, x, seed)


@pytest.mark.parametrize("cifar_stem,channels,size", [(False, 3, 32), (True, 1, 16)], ids=["rgb", "gray_cifar_stem"])
def test_torchvision_snippet_from_the_docs(cifar_stem, channels, size, tmp_path, monkeypatch):
    import_or_skip("torchvision")
    cfg = {"name": "resnet18", "cifar_stem": cifar_stem}
    module = build_encoder(cfg)
    image, preprocessing, x, variables = snippet_inputs(module, size, channels)
    ns = run_snippet(doc_snippet("torchvision"), "export", tmp_path, monkeypatch, cfg, variables, image,
                     preprocessing)
    expected = features(module, variables, x)
    got = ns["features"].numpy()
    assert got.shape == expected.shape == (1, 512)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    # The check has teeth: without model.eval() (BatchNorm on batch statistics) it would fail.
    with torch.no_grad():  # (two copies: BatchNorm trains on more than one value per channel)
        train_mode = ns["model"].train()(ns["preprocess"](ns["image"]).expand(2, -1, -1, -1)).numpy()[:1]
    assert np.abs(train_mode - expected).max() > 0.1 * np.abs(expected).max()


def test_timm_snippet_from_the_docs(tmp_path, monkeypatch):
    import_or_skip("timm")
    import_or_skip("torchvision")
    cfg = {"name": "vit_tiny"}
    module = build_encoder(cfg)
    image, preprocessing, x, variables = snippet_inputs(module, 32, 3)
    ns = run_snippet(doc_snippet("timm"), "export", tmp_path, monkeypatch, cfg, variables, image, preprocessing)
    expected = features(module, variables, x)
    np.testing.assert_allclose(ns["features"].numpy(), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
