"""The CLIP-layout text tower: a float64 NumPy reference, causality, padding invariance, EOS pooling, sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clrjax.models.text import (TEXT_PRESETS, TextTransformer, build_text_tower, num_text_params,
                                text_tower_kwargs)

PAD, EOS, VOCAB = 0, 258, 259
TINY = dict(preset="tiny", context_length=12)


def _tokens(rng, n, length, context):
    """Rows: sot(257), `length` random ids in [1, 257), eot(258), pads up to `context`."""
    out = np.zeros((n, context), np.int32)
    for r, m in enumerate(np.atleast_1d(length) if np.ndim(length) else [length] * n):
        out[r, 0] = 257
        out[r, 1:1 + m] = rng.integers(1, 257, m)
        out[r, 1 + m] = EOS
    return out


def _init(model, tokens, seed=0):
    """Random parameters of the model's shapes (eval_shape: no initializer compiled, which costs
    seconds per model on a loaded CPU); LayerNorm scales near 1, everything else N(0, 0.2^2), biases
    included, so every term of the reference is exercised."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(seed), jnp.asarray(tokens))

    def fill(path, leaf):
        noise = rng.normal(0.0, 0.2, leaf.shape)
        return jnp.asarray(1.0 + 0.5 * noise if path[-1].key == "scale" else noise, jnp.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


_JITTED = {}


def _apply(model, params, tokens):
    """model.apply, jitted once per model (eager flax ops each compile on first use: slower here)."""
    if id(model) not in _JITTED:
        _JITTED[id(model)] = (model, jax.jit(model.apply))
    return _JITTED[id(model)][1](params, tokens)


def _ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _reference(params, tokens, heads, causal, pooling, pad=PAD, eos=EOS):
    """float64 forward written from CLIP's encode_text (official model.py), padding masked out."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    n, length = tokens.shape
    x = p["token_embedding"]["embedding"][tokens] + p["positional_embedding"][:length]
    allowed = np.broadcast_to((tokens != pad)[:, None, :], (n, length, length)).copy()
    if causal:
        allowed &= np.tri(length, dtype=bool)[None]
    i = 0
    while f"resblocks_{i}" in p:
        b = p[f"resblocks_{i}"]
        h = _ln(x, b["ln_1"])
        qkv = h @ b["attn"]["in_proj"]["kernel"] + b["attn"]["in_proj"]["bias"]
        width = x.shape[-1]
        d = width // heads
        qkv = qkv.reshape(n, length, 3, heads, d)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = np.zeros((n, length, heads, d))
        for hd in range(heads):
            s = np.einsum("nqd,nkd->nqk", q[:, :, hd], k[:, :, hd]) / np.sqrt(d)
            s = np.where(allowed, s, -np.inf)
            w = np.exp(s - s.max(-1, keepdims=True))
            w /= w.sum(-1, keepdims=True)
            out[:, :, hd] = np.einsum("nqk,nkd->nqd", w, v[:, :, hd])
        x = x + out.reshape(n, length, width) @ b["attn"]["out_proj"]["kernel"] + b["attn"]["out_proj"]["bias"]
        h = _ln(x, b["ln_2"]) @ b["mlp"]["c_fc"]["kernel"] + b["mlp"]["c_fc"]["bias"]
        h = h / (1 + np.exp(-1.702 * h))  # QuickGELU
        x = x + h @ b["mlp"]["c_proj"]["kernel"] + b["mlp"]["c_proj"]["bias"]
        i += 1
    x = _ln(x, p["ln_final"])
    if pooling == "eos":
        return x[np.arange(n), [list(row).index(eos) for row in tokens]]
    keep = (tokens != pad)[..., None]
    return (x * keep).sum(1) / keep.sum(1)


@pytest.mark.parametrize("causal,pooling", [(True, "eos"), (False, "mean")])
def test_matches_float64_reference(causal, pooling):
    rng = np.random.default_rng(0)
    tokens = _tokens(rng, 4, [3, 7, 1, 10], 12)
    model = build_text_tower(dict(TINY, causal=causal, pooling=pooling))
    params = _init(model, tokens)
    got = np.asarray(_apply(model, params, jnp.asarray(tokens)))
    want = _reference(params, tokens, heads=2, causal=causal, pooling=pooling)
    assert got.shape == (4, 64) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_causal_mask_is_causal():
    """Changing token t changes no hidden state before t (read at every position via EOS pooling)."""
    rng = np.random.default_rng(1)
    tokens = _tokens(rng, 1, 10, 12)
    model = build_text_tower(TINY)
    params = _init(model, tokens)
    changed = tokens.copy()
    changed[0, 6] = (changed[0, 6] % 255) + 1
    for pos in range(1, 6):  # pretend the EOS sits at `pos`: the feature is the hidden state there
        a, b = tokens.copy(), changed.copy()
        a[0, pos] = b[0, pos] = EOS
        fa, fb = _apply(model, params, jnp.asarray(a)), _apply(model, params, jnp.asarray(b))
        np.testing.assert_array_equal(np.asarray(fa), np.asarray(fb))
    a, b = tokens.copy(), changed.copy()  # ... and the real EOS, after position 6, does change
    assert not np.allclose(np.asarray(_apply(model, params, jnp.asarray(a))),
                           np.asarray(_apply(model, params, jnp.asarray(b))))


def test_bidirectional_sees_later_tokens():
    rng = np.random.default_rng(2)
    tokens = _tokens(rng, 1, 10, 12)
    tokens[0, 3] = EOS  # the first EOS is pooled: position 3
    model = build_text_tower(dict(TINY, causal=False))
    params = _init(model, tokens)
    changed = tokens.copy()
    changed[0, 8] = (changed[0, 8] % 255) + 1
    assert not np.allclose(np.asarray(_apply(model, params, jnp.asarray(tokens))),
                           np.asarray(_apply(model, params, jnp.asarray(changed))))


@pytest.mark.parametrize("causal,pooling", [(True, "eos"), (False, "eos"), (False, "mean"), (True, "mean")])
def test_appending_pads_changes_nothing(causal, pooling):
    rng = np.random.default_rng(3)
    short = _tokens(rng, 3, [2, 5, 6], 8)
    long = np.concatenate([short, np.zeros((3, 8), np.int32)], axis=1)  # 8 more pads
    model = build_text_tower(dict(TINY, context_length=16, causal=causal, pooling=pooling))
    params = _init(model, long)
    a = np.asarray(_apply(model, params, jnp.asarray(short)))
    b = np.asarray(_apply(model, params, jnp.asarray(long)))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_eos_pooling_picks_the_eos_position():
    rng = np.random.default_rng(4)
    tokens = _tokens(rng, 3, [2, 5, 8], 12)
    model = build_text_tower(TINY)
    params = _init(model, tokens)
    # The hidden states of every position: each row's EOS moved to every position in turn.
    pooled = np.asarray(_apply(model, params, jnp.asarray(tokens)))
    for row, eos_at in enumerate([3, 6, 9]):
        assert tokens[row, eos_at] == EOS
        # With a causal mask the state at the EOS is the feature; a second EOS later is ignored.
        twice = tokens.copy()
        twice[row, eos_at + 1] = EOS
        np.testing.assert_array_equal(np.asarray(_apply(model, params, jnp.asarray(twice)))[row], pooled[row])
    want = _reference(params, tokens, heads=2, causal=True, pooling="eos")
    np.testing.assert_allclose(pooled, want, rtol=2e-5, atol=2e-5)


def test_eos_id_default_is_the_highest_id():
    assert TextTransformer(vocab_size=VOCAB, context_length=4, width=8, layers=1, heads=1).end_id == VOCAB - 1


def test_clip_b_parameter_count_is_the_papers_63m():
    # CLIP sec. 2.4: "a 63M-parameter 12-layer 512-wide model". Counted from the official model.py
    # layout (no text_projection): token 49408*512, positional 77*512, 12 blocks of
    # (in_proj 512*1536+1536, out_proj 512*512+512, two LNs 2*1024, c_fc 512*2048+2048,
    # c_proj 2048*512+512), ln_final 1024.
    block = (512 * 1536 + 1536) + (512 * 512 + 512) + 2 * 1024 + (512 * 2048 + 2048) + (2048 * 512 + 512)
    expected = 49408 * 512 + 77 * 512 + 12 * block + 1024
    assert expected == 63_165_952
    assert num_text_params({"preset": "clip_b"}) == expected
    assert round(expected / 1e6) == 63


def test_siglip_b_is_bidirectional_768_wide():
    kw = text_tower_kwargs({"preset": "siglip_b"})
    assert (kw["width"], kw["layers"], kw["heads"], kw["context_length"], kw["causal"]) == (768, 12, 12, 64, False)
    # 32000*768 + 64*768 + 12*(768*2304+2304 + 768*768+768 + 2*1536 + 768*3072+3072 + 3072*768+768) + 1536
    block = 768 * 2304 + 2304 + 768 * 768 + 768 + 2 * 1536 + 768 * 3072 + 3072 + 3072 * 768 + 768
    assert num_text_params({"preset": "siglip_b"}) == 32000 * 768 + 64 * 768 + 12 * block + 1536


def test_tokenizer_ids_fill_the_preset():
    class Tok:
        vocab_size, pad_id, eot_id, context_length = 300, 299, 298, 40
    model = build_text_tower({"preset": "clip_b"}, Tok())
    assert (model.vocab_size, model.pad_id, model.end_id, model.context_length) == (300, 299, 298, 40)
    assert build_text_tower({"preset": "clip_b", "context_length": 50}, Tok()).context_length == 50


@pytest.mark.parametrize("cfg,message", [
    ({"preset": "clip_xl"}, "unknown text tower preset 'clip_xl'"),
    ({"preset": "tiny", "depth": 3}, "unknown text tower field(s) ['depth']"),
    ({"width": 8}, "the text tower needs"),
])
def test_bad_configs(cfg, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        build_text_tower(cfg)


def test_too_long_input_fails():
    model = build_text_tower(TINY)
    with pytest.raises(ValueError, match="L <= context_length=12"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 13), jnp.int32))


def test_presets_listed():
    assert {"tiny", "clip_b", "siglip_b", "clip_l"} <= set(TEXT_PRESETS)
