"""Tokenizers: byte-level round trips, truncation keeps eot, padding; SentencePiece trained on the fly."""
import numpy as np
import pytest

from clrjax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, TokenizerError, get_tokenizer

TEXTS = ["a photo of a cat", "Ünïcödé — ñandú, 日本語のキャプション, emoji 🐈‍⬛", ""]


def _body(row, tok):
    """The ids between sot and the first eot."""
    assert row[0] == tok.sot_id
    end = list(row).index(tok.eot_id)
    return row[1:end], end


def test_byte_ids_are_the_utf8_bytes_plus_one():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.sot_id, tok.eot_id) == (259, 0, 257, 258)
    text = TEXTS[1]
    assert tok.encode(text) == [b + 1 for b in text.encode("utf-8")]


def test_byte_round_trip_of_non_ascii_text():
    tok = ByteTokenizer()
    ids = tok.encode_batch(TEXTS, 160)
    assert ids.dtype == np.int32 and ids.shape == (3, 160)
    for row, text in zip(ids, TEXTS):
        body, end = _body(row, tok)
        assert tok.decode(body) == text
        assert tok.decode(row) == text  # specials and pads are dropped
        assert (row[end + 1:] == tok.pad_id).all()
        assert len(body) == len(text.encode("utf-8"))


def test_truncation_keeps_eot_and_is_reported():
    tok = ByteTokenizer()
    ids, cut = tok.encode_batch_counted(TEXTS, 8)
    assert cut.tolist() == [True, True, False]
    for row, text in zip(ids[:2], TEXTS[:2]):
        assert row[0] == tok.sot_id and row[-1] == tok.eot_id
        assert list(row[1:-1]) == tok.encode(text)[:6]
        assert tok.pad_id not in row
    assert ids[2].tolist() == [257, 258, 0, 0, 0, 0, 0, 0]  # empty text: sot, eot, pads


def test_exact_fit_is_not_cut():
    tok = ByteTokenizer()
    ids, cut = tok.encode_batch_counted(["abcd"], 6)
    assert not cut[0] and ids[0].tolist() == [257, 98, 99, 100, 101, 258]


def test_context_too_short_fails():
    with pytest.raises(ValueError, match="context_length must be at least 3"):
        ByteTokenizer().encode_batch(["a"], 2)


def test_get_tokenizer_from_config_sections():
    tok = get_tokenizer({"text": {"tokenizer": "bytes", "vocab_file": "", "context_length": 33}})
    assert isinstance(tok, ByteTokenizer) and tok.context_length == 33
    assert get_tokenizer({"tokenizer": "bytes", "context_length": 5}).settings() == {
        "tokenizer": "bytes", "vocab_file": "", "context_length": 5}


def test_get_tokenizer_bad_input(tmp_path):
    with pytest.raises(TokenizerError, match="config.text.tokenizer is 'wordpiece', which is not supported"):
        get_tokenizer({"tokenizer": "wordpiece"})
    with pytest.raises(TokenizerError, match="config.text.vocab_file is empty"):
        get_tokenizer({"tokenizer": "sentencepiece", "vocab_file": ""})


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (pip install -e '.[text]')")
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "photo", "of", "a", "the", "small", "large", "red", "blue", "shoe", "shirt",
             "chat", "chien", "日本", "語", "ñandú"]
    corpus.write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(400)), encoding="utf-8")
    prefix = folder / "tiny"
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=40,
                                   character_coverage=1.0, model_type="unigram", minloglevel=2)
    return str(prefix) + ".model"


def test_sentencepiece_round_trip_and_specials(sp_model):
    tok = get_tokenizer({"tokenizer": "sentencepiece", "vocab_file": sp_model, "context_length": 40})
    assert isinstance(tok, SentencePieceTokenizer)
    # spm_train's defaults: unk 0, bos 1, eos 2, no pad piece -> pad gets the next id (40).
    assert (tok.sot_id, tok.eot_id, tok.pad_id, tok.vocab_size) == (1, 2, 40, 41)
    texts = ["a small red shoe", "日本語 ñandú chat", ""]
    ids = tok.encode_batch(texts, 40)
    assert ids.shape == (3, 40) and ids.dtype == np.int32 and ids.max() < tok.vocab_size
    for row, text in zip(ids, texts):
        body, end = _body(row, tok)
        assert tok.decode(body) == text
        assert (row[end + 1:] == tok.pad_id).all()


def test_sentencepiece_truncation_keeps_eot(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    long = " ".join(["large blue shirt"] * 20)
    ids, cut = tok.encode_batch_counted([long], 10)
    assert cut[0] and ids[0, 0] == tok.sot_id and ids[0, -1] == tok.eot_id
    assert list(ids[0, 1:-1]) == tok.encode(long)[:8]


def test_sentencepiece_missing_or_bad_file(tmp_path):
    pytest.importorskip("sentencepiece", reason="sentencepiece is not installed (pip install -e '.[text]')")
    missing = str(tmp_path / "nope.model")
    with pytest.raises(TokenizerError, match=f"config.text.vocab_file is '{missing}', which does not exist"):
        get_tokenizer({"tokenizer": "sentencepiece", "vocab_file": missing})
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="is not a SentencePiece model"):
        SentencePieceTokenizer(str(bad))


@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["a photo of a cat", "a small red shoe", "the dog on a sofa"] * 50, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_bpe_round_trip_specials_and_truncation(bpe_file):
    from clrjax.data.tokenizers import BpeTokenizer

    tok = get_tokenizer({"tokenizer": "bpe", "vocab_file": bpe_file, "context_length": 128})
    assert isinstance(tok, BpeTokenizer)
    # CLIP's names: <|startoftext|> and <|endoftext|> are the file's ids 0 and 1; no pad token -> a new id
    assert (tok.sot_id, tok.eot_id) == (0, 1) and tok.pad_id == tok.vocab_size - 1
    ids = tok.encode_batch(TEXTS, 128)  # byte-level: any text, non-ASCII included, round trips
    for row, text in zip(ids, TEXTS):
        body, end = _body(row, tok)
        assert tok.decode(body) == text and (row[end + 1:] == tok.pad_id).all()
    cut, was_cut = tok.encode_batch_counted([TEXTS[1]], 6)
    assert was_cut[0] and cut[0, -1] == tok.eot_id and list(cut[0, 1:-1]) == tok.encode(TEXTS[1])[:4]


def test_bpe_missing_file(tmp_path):
    pytest.importorskip("tokenizers", reason="tokenizers is not installed (pip install tokenizers)")
    with pytest.raises(TokenizerError, match="which does not exist; set --config.text.vocab_file to a tokenizer.json"):
        get_tokenizer({"tokenizer": "bpe", "vocab_file": str(tmp_path / "none.json")})
