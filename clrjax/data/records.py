"""Which sources are read as raw records (TFDS array_record) rather than by ``source[rows]``.

Its own module so that both the loader (:mod:`clrjax.data.pipeline`, which
picks the reader) and the grain reader (:mod:`clrjax.data.grain_reader`,
which reads the records) can ask without importing each other, and the loader
can ask without importing grain (~1 s).
"""
from __future__ import annotations


def has_record_source(source) -> bool:
    """Whether ``source`` exposes a raw record source (``data_source``) and its ``decode`` (TfdsSource)."""
    return hasattr(source, "data_source") and callable(getattr(source, "decode", None))
