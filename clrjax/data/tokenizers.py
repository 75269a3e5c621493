"""Tokenizers for captions: text -> int32 [n, L] token ids, on the host, in the data pipeline.

Two, with one API (``vocab_size``, ``pad_id``, ``sot_id``, ``eot_id``,
``context_length``, ``encode``, ``decode``, ``encode_batch``):

* :class:`ByteTokenizer` (``text.tokenizer = 'bytes'``, the default): the
  UTF-8 bytes of the text, byte b as id b + 1, plus three special ids:
  pad 0, start-of-text 257, end-of-text 258 (vocab_size 259). No vocabulary
  file, so it works offline and on any script; a caption costs one token
  per byte (about 1.1 per character for English, 2-3 for most other
  scripts), so give it a longer context than a subword vocabulary needs.
  Its end-of-text id is its highest id, as CLIP's (whose text tower pools
  at ``argmax`` of the ids).
* :class:`SentencePieceTokenizer` (``text.tokenizer = 'sentencepiece'``,
  ``text.vocab_file`` = a local ``.model`` file): Google's ``sentencepiece``
  package (``pip install -e '.[text]'``), the tokenizer library of T5 and of
  SigLIP's text towers (big_vision), maintained, with wheels for every
  platform and no network access: a trained model file is all it reads.
  The model's own pad / bos / eos pieces are used when it defines them;
  missing ones get new ids after its pieces (so ``vocab_size`` may exceed
  the model's piece count by up to 3).
* :class:`BpeTokenizer` (``text.tokenizer = 'bpe'``, ``text.vocab_file`` = a
  local Hugging Face ``tokenizer.json``, e.g. the one CLIP's byte-level BPE
  ships with on the Hub): the ``tokenizers`` package (``pip install
  tokenizers``), Hugging Face's Rust tokenizer library, read offline from the
  file. Start/end/pad are the file's ``<|startoftext|>`` / ``<|endoftext|>``
  (CLIP), ``<s>`` / ``</s>``, ``[CLS]`` / ``[SEP]`` or ``<pad>`` / ``[PAD]``
  tokens where it has them, else new ids after its vocabulary.

``encode_batch(texts, L)`` writes ``sot, tokens, eot`` and pads with
``pad_id`` to L; a text longer than ``L - 2`` tokens is cut so that eot is
always the last non-pad token (:meth:`encode_batch_counted` also says which
rows were cut, for the metrics). The text tower pools at the first eot and
masks pads (``clrjax/models/text.py``).
"""
from __future__ import annotations

import os
from typing import List, Mapping, Sequence, Tuple

import numpy as np

TOKENIZERS = ("bytes", "sentencepiece", "bpe")
MIN_CONTEXT = 3  # sot + at least one token + eot


class TokenizerError(ValueError):
    """A tokenizer cannot be built (missing package or vocabulary file); the message says the fix."""


class _Tokenizer:
    """The shared ``encode_batch`` over a subclass's ``encode`` (text -> ids without specials)."""

    vocab_size: int
    pad_id: int
    sot_id: int
    eot_id: int
    context_length: int

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def _ids(self, text: str) -> np.ndarray:
        """``encode`` as an int array (what ``encode_batch`` writes; subclasses may do it faster)."""
        return np.asarray(self.encode(text), np.int32)

    def encode_batch_counted(self, texts: Sequence[str], context_length: int) -> Tuple[np.ndarray, np.ndarray]:
        """(int32 [n, L] ids, bool [n] whether the row's text was cut to fit L)."""
        length = int(context_length)
        if length < MIN_CONTEXT:
            raise ValueError(f"context_length must be at least {MIN_CONTEXT} (sot, a token, eot), got {length}")
        out = np.full((len(texts), length), self.pad_id, np.int32)
        cut = np.zeros((len(texts),), bool)
        room = length - 2
        for row, text in enumerate(texts):
            ids = self._ids(text)
            cut[row] = len(ids) > room
            ids = ids[:room]
            out[row, 0] = self.sot_id
            out[row, 1:1 + len(ids)] = ids
            out[row, 1 + len(ids)] = self.eot_id
        return out, cut

    def encode_batch(self, texts: Sequence[str], context_length: int) -> np.ndarray:
        """int32 [n, L]: sot + ids + eot (cut to fit), padded with ``pad_id``."""
        return self.encode_batch_counted(texts, context_length)[0]

    def settings(self) -> dict:
        """What an export records to rebuild this tokenizer (:func:`get_tokenizer` takes it back)."""
        raise NotImplementedError


class ByteTokenizer(_Tokenizer):
    """UTF-8 bytes: byte b -> id b + 1; pad 0, sot 257, eot 258; vocab_size 259 (module docstring)."""

    vocab_size, pad_id, sot_id, eot_id = 259, 0, 257, 258

    def __init__(self, context_length: int = 77):
        self.context_length = int(context_length)

    def encode(self, text: str) -> List[int]:
        return [b + 1 for b in text.encode("utf-8")]

    def _ids(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + 1

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; special ids are dropped, and a cut multi-byte character is replaced (U+FFFD)."""
        data = bytes(int(i) - 1 for i in ids if 1 <= int(i) <= 256)
        return data.decode("utf-8", errors="replace")

    def settings(self) -> dict:
        return {"tokenizer": "bytes", "vocab_file": "", "context_length": self.context_length}


class SentencePieceTokenizer(_Tokenizer):
    """A trained SentencePiece model file (module docstring); ``pip install sentencepiece``."""

    def __init__(self, model_path: str, context_length: int = 64):
        try:
            import sentencepiece
        except ImportError:
            raise TokenizerError("text.tokenizer is 'sentencepiece' but the sentencepiece package is not "
                                 "installed; pip install -e '.[text]' (or sentencepiece), or set "
                                 "--config.text.tokenizer=bytes.") from None
        path = _vocab_file(model_path, "a SentencePiece .model file")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"config.text.vocab_file {model_path!r} is not a SentencePiece model "
                                 f"({str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__}); "
                                 f"point it at the .model file spm_train wrote.") from None
        self.model_path = path
        self.context_length = int(context_length)
        size = self._sp.get_piece_size()
        extra = iter(range(size, size + 3))
        # Ids the model lacks (sentencepiece marks them -1) get fresh ids after its pieces.
        self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else next(extra)
        self.sot_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else next(extra)
        self.eot_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else next(extra)
        self.vocab_size = max(size, self.pad_id + 1, self.sot_id + 1, self.eot_id + 1)

    def encode(self, text: str) -> List[int]:
        return list(self._sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        size = self._sp.get_piece_size()
        special = {self.pad_id, self.sot_id, self.eot_id}
        return self._sp.decode([int(i) for i in ids if int(i) not in special and 0 <= int(i) < size])

    def settings(self) -> dict:
        return {"tokenizer": "sentencepiece", "vocab_file": self.model_path, "context_length": self.context_length}


def _vocab_file(path: str, kind: str) -> str:
    """``path`` with ``~`` expanded; a one-sentence error naming the field when it is not a file."""
    file = os.path.expanduser(str(path))
    if not os.path.isfile(file):
        raise TokenizerError(f"config.text.vocab_file is {path!r}, which does not exist; set "
                             f"--config.text.vocab_file to {kind}.")
    return file


_BPE_SPECIALS = {
    "sot": ("<|startoftext|>", "<s>", "[CLS]", "<bos>"),
    "eot": ("<|endoftext|>", "</s>", "[SEP]", "<eos>"),
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
}


class BpeTokenizer(_Tokenizer):
    """A Hugging Face ``tokenizer.json`` (module docstring); ``pip install tokenizers``."""

    def __init__(self, path: str, context_length: int = 77):
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError("text.tokenizer is 'bpe' but the tokenizers package is not installed; pip install "
                                 "tokenizers, or set --config.text.tokenizer=bytes.") from None
        file = _vocab_file(path, "a tokenizer.json file")
        try:
            self._tok = tokenizers.Tokenizer.from_file(file)
        except Exception as err:  # noqa: BLE001 - the Rust side raises plain Exception
            raise TokenizerError(f"config.text.vocab_file {path!r} is not a tokenizers tokenizer.json "
                                 f"({str(err).strip()[:200]}); point it at a tokenizer.json file.") from None
        self.model_path = file
        self.context_length = int(context_length)
        size = self._tok.get_vocab_size(with_added_tokens=True)
        extra = iter(range(size, size + 3))

        def special(kind):
            found = (self._tok.token_to_id(t) for t in _BPE_SPECIALS[kind])
            return next((i for i in found if i is not None), None)
        ids = {kind: special(kind) for kind in ("pad", "sot", "eot")}
        self.pad_id, self.sot_id, self.eot_id = (ids[k] if ids[k] is not None else next(extra)
                                                 for k in ("pad", "sot", "eot"))
        self.vocab_size = max(size, self.pad_id + 1, self.sot_id + 1, self.eot_id + 1)
        self._base_size = size

    def encode(self, text: str) -> List[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        special = {self.pad_id, self.sot_id, self.eot_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special and 0 <= int(i) < self._base_size],
                                skip_special_tokens=True)

    def settings(self) -> dict:
        return {"tokenizer": "bpe", "vocab_file": self.model_path, "context_length": self.context_length}


def _field(cfg, key: str, default):
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def get_tokenizer(cfg: Mapping) -> _Tokenizer:
    """The tokenizer of ``config.text`` (or of a whole config, whose ``text`` section is read).

    Fields: ``tokenizer`` ('bytes' | 'sentencepiece' | 'bpe'), ``vocab_file`` (sentencepiece: the
    ``.model`` file; bpe: a ``tokenizer.json``), ``context_length`` (L of ``encode_batch`` and the
    text tower).
    """
    if hasattr(cfg, "get") and cfg.get("text", None) is not None:
        cfg = cfg["text"]
    kind = str(_field(cfg, "tokenizer", "bytes"))
    length = int(_field(cfg, "context_length", 77))
    if kind == "bytes":
        return ByteTokenizer(length)
    if kind in ("sentencepiece", "bpe"):
        vocab = str(_field(cfg, "vocab_file", ""))
        if not vocab:
            what = "a SentencePiece .model file" if kind == "sentencepiece" else "a tokenizer.json file"
            raise TokenizerError(f"config.text.tokenizer is {kind!r} but config.text.vocab_file is empty; "
                                 f"set --config.text.vocab_file to {what}.")
        return (SentencePieceTokenizer if kind == "sentencepiece" else BpeTokenizer)(vocab, length)
    raise TokenizerError(f"config.text.tokenizer is {kind!r}, which is not supported; use one of "
                         f"{', '.join(TOKENIZERS)}.")
