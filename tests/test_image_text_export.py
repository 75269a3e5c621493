"""Image-text exports (clip, siglip): both towers, the tokenizer and the learned scale/bias.

The reference is the run's own two-tower model (clrjax/methods/image_text.py ``TwoTower``,
``embed_image`` / ``encode_text``) applied to the variables the export was made from -- for the
SigLIP run, restored from its checkpoint with clrjax.checkpoint, not through any export code --
then normalised, and the logits ``scale * u.v + bias`` (CLIP sec. 2.3, SigLIP eq. 1), in float64
NumPy. Tolerance 1e-5 absolute on unit vectors (float32 towers, 'highest' matmul precision).
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax import methods, parallel, train
from clrjax.checkpoint import Checkpointer
from clrjax.data import augment, tokenizers
from clrjax.export import (IMAGE_TEXT_FILE, IMAGE_TEXT_SAFETENSORS_FILE, TOKENIZER_DIR, VOCAB_TENSOR,
                           export_encoder, export_image_text, flatten_variables, load_encoder, load_image_text)
from tests.methods.test_harness import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


def _unit64(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_images(n, seed=0, shape=(12, 10, 1)):
    """uint8 images of another size than the crop: the export's centre crop and resize run."""
    return np.random.default_rng(seed).integers(0, 256, (n,) + shape, dtype=np.uint8)


def random_captions(n, seed=0):
    """Random strings: ASCII, accents, CJK, empty, and longer than the context (cut to fit)."""
    rng = np.random.default_rng(seed)
    alphabet = list("abcdefghij klmnopqrstuvwxyz.,") + ["é", "ß", "日", "本"]
    lengths = [0, 1, 200] + list(rng.integers(2, 40, n - 3))
    return ["".join(rng.choice(alphabet, k)) for k in lengths]


def reference_embeddings(model, variables, config, images, captions, tokenizer):
    """(image, text) float64 embeddings, unnormalised, from the TwoTower itself."""
    x = augment.preprocess_eval(jnp.asarray(images), config.augment.to_dict())
    img = jax.jit(lambda v, x: model.apply(v, x, method=model.embed_image))(variables, x)
    tokens = jnp.asarray(tokenizer.encode_batch(captions, config.text.context_length))
    txt = jax.jit(lambda v, t: model.apply(v, t, method=model.encode_text))(variables, tokens)
    return np.asarray(img, np.float64), np.asarray(txt, np.float64)


# --------------------------------------------------------------------------- a SigLIP run, exported by the CLI


@pytest.fixture(scope="module")
def siglip_run(tmp_path_factory):
    """A finished 2-step SigLIP run on digits captions (one device) and its export by experiments/export.py."""
    workdir = str(tmp_path_factory.mktemp("siglip") / "run")
    config = tiny_config("siglip", num_steps=2, **{"checkpoint.every_steps": 2})
    train.train(config, workdir, mesh=parallel.make_mesh(jax.devices()[:1]))
    out = os.path.join(os.path.dirname(workdir), "export")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "export.py"), f"--workdir={workdir}",
                           f"--out={out}", "--formats=orbax,safetensors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return config, workdir, out, proc.stdout


def _checkpoint_variables(workdir, step):
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), every_steps=1, keep=10)
    state = checkpointer.restore_subtree(step, keys=("params", "batch_stats"))
    checkpointer.close()
    return {"params": state["params"], "batch_stats": state["batch_stats"]}


@pytest.mark.parametrize("source", ["directory", "safetensors"])
def test_siglip_export_embeds_as_the_checkpoints_towers(siglip_run, source):
    config, workdir, out, stdout = siglip_run
    assert f"exported cnn_small + text tower of {workdir} step 2 (orbax, safetensors) -> {out}" in stdout
    assert not os.path.exists(os.path.join(out, TOKENIZER_DIR))  # the byte tokenizer has no vocabulary file
    variables = _checkpoint_variables(workdir, 2)
    model = methods.get("siglip").build_model(config, 10)
    tokenizer = tokenizers.get_tokenizer(config.text.to_dict())
    images, captions = random_images(7), random_captions(9)
    img, txt = reference_embeddings(model, variables, config, images, captions, tokenizer)

    loaded = load_image_text(out if source == "directory" else os.path.join(out, IMAGE_TEXT_SAFETENSORS_FILE))
    got_img, got_txt = loaded.encode_image(images), loaded.encode_text(captions)
    assert got_img.shape == (7, 16) and got_txt.shape == (9, 16)
    np.testing.assert_allclose(got_img, _unit64(img), atol=ATOL)
    np.testing.assert_allclose(got_txt, _unit64(txt), atol=ATOL)
    np.testing.assert_allclose(loaded.encode_text(captions, normalize=False), txt, rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(img, axis=1).std() > 0  # normalisation is not vacuous
    # The learned scalars, and the logits of SigLIP's loss: t u.v + b with t = exp(log_t).
    log_t, bias = (float(variables["params"][k]) for k in ("log_t", "bias"))
    assert log_t != pytest.approx(np.log(10.0), abs=1e-7)  # the 2 steps moved it off its init
    assert (loaded.method, loaded.logit_scale, loaded.bias) == ("siglip", log_t, bias)
    want = np.exp(log_t) * _unit64(img) @ _unit64(txt).T + bias
    np.testing.assert_allclose(loaded.logits(got_img, got_txt), want, atol=1e-4)
    # The tokenizer settings came back: same ids as training's, including a caption cut to fit.
    np.testing.assert_array_equal(loaded.tokenize(captions), tokenizer.encode_batch(captions, 64))
    # load_encoder on the same export still gives the image backbone's features.
    x = augment.preprocess_eval(jnp.asarray(images), config.augment.to_dict())
    features = model.apply(variables, x, method=model.encode)
    np.testing.assert_allclose(np.asarray(load_encoder(out)(x)), np.asarray(features), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(load_encoder(os.path.join(out, IMAGE_TEXT_SAFETENSORS_FILE))(x)),
                               np.asarray(features), rtol=1e-5, atol=1e-5)


def test_siglip_export_records_the_settings(siglip_run):
    config, workdir, out, _ = siglip_run
    settings = json.load(open(os.path.join(out, IMAGE_TEXT_FILE)))
    assert settings["method"] == "siglip" and settings["embed_dim"] == 16 and settings["image_projection"]
    assert settings["tokenizer"] == {"tokenizer": "bytes", "vocab_file": "", "context_length": 64,
                                     "vocab_size": 259, "pad_id": 0, "sot_id": 257, "eot_id": 258}
    assert settings["text_tower"] == dict(vocab_size=259, context_length=64, width=64, layers=2, heads=2,
                                          mlp_ratio=4, pooling="eos", causal=True, pad_id=0, eos_id=258,
                                          activation="quick_gelu", dtype="float32")
    assert set(settings["scalars"]) == {"log_t", "bias"}
    assert settings["augment"]["crop_size"] == config.augment.crop_size


# --------------------------------------------------------------------------- CLIP, from variables (no training)


def clip_two_tower(seed=0, **overrides):
    """A tiny CLIP TwoTower with non-trivial BatchNorm statistics and a logit scale above the cap."""
    config = tiny_config("clip", **overrides)
    model = methods.get("clip").build_model(config, 10)
    crop = config.augment.crop_size
    init = jax.jit(lambda key: model.init(key, jnp.zeros((2, crop, crop, 1)), train=False))  # eager: 10x slower
    variables = jax.device_get(init(jax.random.PRNGKey(seed)))
    rng = np.random.default_rng(seed)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, a: a + rng.normal(0, 0.2, a.shape) if p[-1].key == "mean" else a * rng.uniform(0.5, 1.5, a.shape),
        variables["batch_stats"])
    params = dict(variables["params"], logit_scale=np.float32(5.0))  # exp(5) > 100: the loss caps it
    return config, model, {"params": params, "batch_stats": stats}


def documented_name_patterns():
    """The name column of the image_text.safetensors table in docs/EVALUATION.md, as regexes."""
    with open(os.path.join(ROOT, "docs", "EVALUATION.md")) as f:
        text = f.read()
    first = text.index("\n|", text.index("<!-- image-text-names -->")) + 1
    table = text[first:text.index("\n\n", first)]
    patterns = []
    for row in table.splitlines()[2:]:  # below the header and its separator
        for name in re.findall(r"`([^`]+)`", row.split("|")[1]):
            regex = re.escape(name).replace(r"\{i\}", r"\d+").replace(r"\.\.\.", ".+")
            regex = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(" + m[1].replace(",", "|") + ")", regex)
            patterns.append(re.compile(regex + "$"))
    assert len(patterns) >= 10
    return patterns


def test_clip_safetensors_has_the_documented_names_and_round_trips(tmp_path):
    from safetensors.numpy import load_file

    config, model, variables = clip_two_tower()
    tokenizer = tokenizers.get_tokenizer(config.text.to_dict())
    written = export_image_text(str(tmp_path), config.model.to_dict(), model, variables, tokenizer, method="clip",
                                augment=config.augment.to_dict(), formats=("orbax", "safetensors"))
    arrays = load_file(written["image_text_safetensors"])
    patterns = documented_name_patterns()
    undocumented = [n for n in arrays if not any(p.match(n) for p in patterns)]
    assert not undocumented
    for name in ("params/encoder/conv_0/kernel", "batch_stats/encoder/bn_0/mean", "params/image_projection/kernel",
                 "params/text_encoder/token_embedding/embedding", "params/text_encoder/positional_embedding",
                 "params/text_encoder/resblocks_1/attn/in_proj/kernel", "params/text_encoder/ln_final/scale",
                 "params/text_projection/kernel", "params/logit_scale"):
        assert name in arrays, name
    assert not any("probe" in n for n in arrays)  # the online probe is a training artefact
    flat = flatten_variables(variables)
    for name, value in arrays.items():
        np.testing.assert_array_equal(value, flat[name])
    assert arrays["params/text_encoder/resblocks_0/attn/in_proj/kernel"].shape == (64, 192)

    images, captions = random_images(5, seed=1), random_captions(6, seed=1)
    img, txt = reference_embeddings(model, variables, config, images, captions, tokenizer)
    # (both sources are compared tower by tower in the SigLIP test; here the directory)
    loaded = load_image_text(str(tmp_path))
    for scalars in (loaded, load_image_text(written["image_text_safetensors"])):
        assert scalars.bias is None and scalars.logit_scale == 5.0 and scalars.scale == pytest.approx(100.0)
    got_img, got_txt = loaded.encode_image(images), loaded.encode_text(captions)
    np.testing.assert_allclose(got_img, _unit64(img), atol=ATOL)
    np.testing.assert_allclose(got_txt, _unit64(txt), atol=ATOL)
    np.testing.assert_allclose(loaded.logits(got_img, got_txt), 100.0 * _unit64(img) @ _unit64(txt).T, atol=1e-3)
    # One string is one caption; a preprocessed float batch skips the preprocessing.
    np.testing.assert_allclose(loaded.encode_text(captions[3]), loaded.encode_text(captions[3:4]), atol=1e-6)
    x = np.asarray(augment.preprocess_eval(jnp.asarray(images), config.augment.to_dict()))
    np.testing.assert_allclose(loaded.encode_image(x), got_img, atol=1e-6)


# --------------------------------------------------------------------------- the vocabulary file


def _fake_vocab_tokenizer(path):
    """The record of a SentencePiece tokenizer (the package need not be installed to export its file)."""
    return types.SimpleNamespace(
        settings=lambda: {"tokenizer": "sentencepiece", "vocab_file": path, "context_length": 64},
        vocab_size=259, pad_id=0, sot_id=257, eot_id=258)


def test_vocabulary_file_is_copied_into_the_export_and_checked(tmp_path):
    config, model, variables = clip_two_tower()
    vocab = tmp_path / "spm.model"
    vocab.write_bytes(bytes(range(256)) * 3)
    out = tmp_path / "export"
    export_image_text(str(out), config.model.to_dict(), model, variables, _fake_vocab_tokenizer(str(vocab)),
                      method="clip", formats=("orbax", "safetensors"))
    record = json.load(open(out / IMAGE_TEXT_FILE))["tokenizer"]
    assert record["vocab_file"] == "tokenizer/spm.model"
    assert record["vocab_sha256"] == hashlib.sha256(vocab.read_bytes()).hexdigest()
    assert (out / "tokenizer" / "spm.model").read_bytes() == vocab.read_bytes()
    from safetensors.numpy import load_file
    assert load_file(str(out / IMAGE_TEXT_SAFETENSORS_FILE))[VOCAB_TENSOR].tobytes() == vocab.read_bytes()

    (out / "tokenizer" / "spm.model").write_bytes(b"edited")
    with pytest.raises(ValueError, match=r"the vocabulary file of .* \(tokenizer/spm.model\) differs from the one "
                                         r"exported \(sha256 mismatch\); restore it or re-export the run"):
        load_image_text(str(out))
    (out / "tokenizer" / "spm.model").unlink()
    with pytest.raises(ValueError, match=r"has no vocabulary file for its 'sentencepiece' tokenizer "
                                         r"\('tokenizer/spm.model' is missing\); re-export the run"):
        load_image_text(str(out))


def tiny_bpe_file(path):
    """A byte-level BPE tokenizer.json with CLIP's start/end tokens, trained on a few captions."""
    hf = pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    tok = hf.Tokenizer(hf.models.BPE())
    tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = hf.decoders.ByteLevel()
    trainer = hf.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                     initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a photo of a cat", "a small red shoe", "the dog on a sofa"] * 50, trainer)
    tok.save(str(path))
    return str(path)


def test_bpe_export_is_self_contained(tmp_path):
    vocab = tiny_bpe_file(tmp_path / "tokenizer.json")
    config, model, variables = clip_two_tower(**{"text.tokenizer": "bpe", "text.vocab_file": vocab})
    tokenizer = tokenizers.get_tokenizer(config.text.to_dict())
    captions = ["a photo of a cat", "the small red dog", "a" * 300]
    _, txt = reference_embeddings(model, variables, config, random_images(1), captions, tokenizer)
    out = str(tmp_path / "export")
    export_image_text(out, config.model.to_dict(), model, variables, tokenizer, method="clip",
                      formats=("orbax", "safetensors"))
    os.remove(vocab)  # the export holds its own copy
    for path in (out, os.path.join(out, IMAGE_TEXT_SAFETENSORS_FILE)):
        loaded = load_image_text(path)
        assert loaded.tokenizer.eot_id == tokenizer.eot_id
        np.testing.assert_allclose(loaded.encode_text(captions), _unit64(txt), atol=ATOL)


# --------------------------------------------------------------------------- an export without a text tower


def test_load_image_text_of_an_encoder_export_names_load_encoder(tmp_path):
    config, _, variables = clip_two_tower()
    encoder = {"params": variables["params"]["encoder"], "batch_stats": variables["batch_stats"]["encoder"]}
    export_encoder(str(tmp_path), config.model.to_dict(), encoder, formats=("orbax", "safetensors"))
    for path in (str(tmp_path), str(tmp_path / "encoder.safetensors")):
        with pytest.raises(ValueError, match=r"is an image-encoder export without a text tower \(no image_text.json\); "
                                             r"load its encoder with clrjax.export.load_encoder"):
            load_image_text(path)
