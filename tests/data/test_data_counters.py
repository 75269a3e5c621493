"""Captions cut to the context and bad inputs skipped: counted as batches are yielded, summed over
processes, logged in metrics.jsonl (``captions_cut``, ``data_skipped``) and kept across a resume.

The references never ask the loader what it drew: a caption names its example and variant
("k7 v1 ..."), so the token rows of a batch say which captions were drawn (the prefix survives the
cut), and the count is of those whose UTF-8 length plus sot/eot exceeds the context. The trainer
test recomputes the drawn examples from the documented order, ``permutation(N)`` of
``SeedSequence([seed, epoch])``, with NumPy.
"""
import json
import os
import threading

import jax
import numpy as np
import pytest
from PIL import Image

from clrjax import parallel, train
from clrjax.data import counters
from clrjax.data.pipeline import CUT_FIELD, TrainLoader
from clrjax.data.sources import ArraySource, DataError, load_source
from clrjax.data.tokenizers import ByteTokenizer
from tests.data.test_captions import _cfg, _write_shards
from tests.methods.test_harness import tiny_config

N, L = 24, 12
TOK = ByteTokenizer(L)


def _caption(k, v):
    """Short (fits L=12 with sot/eot) for some (k, v), longer than the context for the others."""
    return f"k{k} v{v}" + (" a long caption" if (k + v) % 3 == 0 else "")


def _is_cut(text: str, context: int) -> bool:
    return len(text.encode("utf-8")) + 2 > context  # sot + bytes + eot must fit


def _drawn(batch):
    """(k, v) of every row, read from its tokens."""
    out = []
    for row in batch["text"]:
        k, v = TOK.decode(row).split()[:2]
        out.append((int(k[1:]), int(v[1:])))
    return out


def _source():
    images = np.arange(N * 16, dtype=np.uint8).reshape(N, 4, 4, 1)
    return ArraySource(images, np.arange(N) % 3, captions=[[_caption(k, v) for v in range(1 + k % 3)]
                                                          for k in range(N)])


@pytest.mark.parametrize("processes,prefetch,reader", [(1, 0, "direct"), (1, 3, "direct"), (2, 2, "direct"),
                                                       (1, 2, "grain")])
def test_loader_counts_cut_captions_of_the_batches_it_yields(processes, prefetch, reader):
    src = _source()
    loaders = [TrainLoader(src, 8, 3, process_index=p, process_count=processes, prefetch=prefetch,
                           start_step=1, tokenizer=TOK, reader=reader) for p in range(processes)]
    want = 0
    try:
        for _ in range(5):  # steps 1..5 of 3 a epoch: two epochs, captions drawn again
            for ld in loaders:
                batch = next(ld)
                assert CUT_FIELD not in batch
                want += sum(_is_cut(_caption(k, v), L) for k, v in _drawn(batch))
            # counted when yielded: the batches the prefetch thread has read ahead are not in it
            assert sum(ld.captions_cut for ld in loaders) == want
        assert 0 < want < 5 * 8
        before = loaders[0].captions_cut
        assert CUT_FIELD not in loaders[0].batch_at(9)  # the reference reader changes no count
        assert loaders[0].captions_cut == before
    finally:
        for ld in loaders:
            ld.close()


def test_stream_reader_counts_cut_captions_of_the_batches_it_yields(tmp_path):
    """Tar shards (the stream reader, its captions tokenized in the reader thread)."""
    pattern = _write_shards(str(tmp_path / "shards"), json_every=1)  # every sample: its 3 captions
    src = load_source(_cfg(pattern, name="webdataset", caption_column="txt"), "train")
    captions = {k: src.captions_of([k])[0] for k in range(len(src))}
    context = 13  # _write_shards' captions ("k7 v2 ünï": 11 bytes, 12 from k10): + sot/eot, k >= 10 are cut
    with TrainLoader(src, 8, 1, prefetch=2, tokenizer=ByteTokenizer(context)) as ld:
        want = 0
        for _ in range(4):
            batch = next(ld)
            for row in batch["text"]:
                k, v = ByteTokenizer().decode(row).split()[:2]
                want += _is_cut(captions[int(k[1:])][int(v[1:])], context)
            assert ld.captions_cut == want
    assert 0 < want < 32


class FakeProcesses:
    """``allgather`` for P threads standing in for P processes: each call stacks every thread's x."""

    def __init__(self, count):
        self.count, self._slots = count, [None] * count
        self._barrier = threading.Barrier(count)
        self._local = threading.local()

    def run(self, fn, args):
        results, errors = [None] * self.count, []

        def one(p):
            self._local.p = p
            try:
                results[p] = fn(*args[p], allgather=self.allgather)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                self._barrier.abort()
        threads = [threading.Thread(target=one, args=(p,)) for p in range(self.count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results

    def allgather(self, x):
        self._slots[self._local.p] = np.asarray(x)
        self._barrier.wait()
        out = np.stack(self._slots)
        self._barrier.wait()
        return out


def test_gather_and_combine_over_three_processes():
    snaps = [counters.Snapshot(3 * 2**31 + 5, 2, np.asarray([4, 9], np.int64)),  # past int32: sent in two halves
             counters.Snapshot(7, 2, np.asarray([9, 11, 30, 2**40], np.int64)),
             counters.Snapshot(0, 2, np.zeros((0,), np.int64))]
    fake = FakeProcesses(3)
    gathered = fake.run(counters.gather, [(s,) for s in snaps])
    for everyone in gathered:  # every process sees every snapshot, in process order
        assert [s.captions_cut for s in everyone] == [s.captions_cut for s in snaps]
        assert [s.bad.tolist() for s in everyone] == [s.bad.tolist() for s in snaps]
        # listed once (every process lists the same split), bad ids united: 4, 9, 11, 30, 2**40
        assert counters.combine(everyone, captions_cut_before=100) == {
            "captions_cut": 100 + 3 * 2**31 + 12, "data_skipped": 2 + 5}
    none = [counters.Snapshot(None, None, np.zeros((0,), np.int64))] * 2
    two = FakeProcesses(2).run(counters.gather, [(s,) for s in none])
    assert counters.combine(two[0]) == {}  # no tokenizer, no bad-input log: no column


def test_snapshot_of_a_source_with_skipped_listing_and_decoding(tmp_path):
    """data_skipped = rows left out while listing + images found not to decode (one process: the old count)."""
    folder = tmp_path / "images"
    folder.mkdir()
    rows = ["path,label,text"]
    for k in range(12):
        Image.fromarray(np.full((4, 4), k * 9, np.uint8)).save(folder / f"{k}.png")
        rows.append(f"images/{k}.png,{k % 2},{_caption(k, 0)}")
    rows.append("images/gone.png,0,a caption")  # line 14: missing file, left out while listing
    (folder / "3.png").write_bytes(b"not a png")  # found when decoded
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    src = load_source(_cfg(tmp_path / "list.csv", caption_column="text", on_error="skip", image_size=4), "train")
    assert len(src) == 12 and src.errors.by_kind == {"missing_path": 1}
    with TrainLoader(src, 12, 0, prefetch=0, tokenizer=TOK) as ld:
        next(ld)
        snap = counters.snapshot(src, ld)
    assert snap.listed == 1 and snap.bad.tolist() == [3] and src.num_skipped == 2
    assert counters.combine([snap]) == {"captions_cut": ld.captions_cut, "data_skipped": 2}
    assert ld.captions_cut == sum(_is_cut(_caption(k, 0), L) for k in range(12) if k != 3) + _is_cut(
        _caption(4, 0), L)  # 3 does not decode: its row holds example 4 (the next that decodes) and its caption


def test_missing_image_in_a_captioned_tsv_names_the_line_or_is_skipped_and_counted(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for k in (0, 2):
        Image.fromarray(np.full((4, 4), k, np.uint8)).save(folder / f"{k}.png")
    path = tmp_path / "list.tsv"
    path.write_text("path\tcaption\nimages/0.png\ta\nimages/1.png\tb\nimages/2.png\tc\n")
    with pytest.raises(DataError) as err:
        load_source(_cfg(path, name="tsv"), "train")
    assert str(err.value) == (
        f"{path} line 3: names 'images/1.png', and {folder / '1.png'} does not exist; fix the path (relative paths "
        f"are relative to the list file), or set --config.dataset.on_error=skip to leave such input out and count it.")
    src = load_source(_cfg(path, name="tsv", on_error="skip"), "train")
    assert len(src) == 2 and src.captions_of([0, 1]) == [["a"], ["c"]] and src.errors.by_kind == {"missing_path": 1}


# --------------------------------------------------------------------------- through the trainer


def _captioned_csv(folder, n, long_every=3):
    """n 8x8 PNGs, labels k % 10, one caption each (every ``long_every``-th longer than 64 tokens), plus a
    row naming a file that does not exist."""
    os.makedirs(folder, exist_ok=True)
    rows = ["path,label,text"]
    for k in range(n):
        Image.fromarray(np.full((8, 8), k * 3, np.uint8)).save(os.path.join(folder, f"{k}.png"))
        rows.append(f"{k}.png,{k % 10},k{k} v0" + (" a long caption" * 5 if k % long_every == 0 else ""))
        if k == 5:
            rows.append("missing.png,0,k99 v0")  # skipped while listing (on_error=skip), counted
    path = os.path.join(folder, "list.csv")
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return path


def test_trainer_logs_captions_cut_and_data_skipped_and_keeps_the_count_on_resume(tmp_path):
    """SigLIP's tiny run of tests/test_image_text_export.py (one device, 2 steps of 32, 8x8x1 images,
    10 classes, context 64): the same step program, so the shared compilation cache serves it."""
    n, batch, seed, context = 48, 32, 3, 64
    path = _captioned_csv(str(tmp_path / "data"), n)
    config = tiny_config("siglip", num_steps=2, **{
        "checkpoint.every_steps": 2, "dataset.name": "csv", "dataset.path": path, "dataset.image_size": 8,
        "dataset.channels": 1, "dataset.caption_column": "text", "dataset.on_error": "skip",
        "dataset.decode_processes": 0, "dataset.decode_workers": 2, "seed": seed})
    assert config.text.context_length == context and config.batch_size == batch
    workdir = str(tmp_path / "run")
    mesh = parallel.make_mesh(jax.devices()[:1])
    first = train.train(config, workdir, mesh=mesh, stop_after_steps=1)  # saved at step 1, resumed below
    assert int(first.state.step) == 1
    train.train(config, workdir, mesh=mesh)
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2]
    # NumPy reference: step s draws perm_e[t*B:(t+1)*B] of permutation(N) seeded by [seed, e]
    long = np.asarray([k % 3 == 0 for k in range(n)])  # 6 + 75 bytes + sot/eot > 64
    steps_per_epoch, want = n // batch, []
    for s in range(2):
        e, t = divmod(s, steps_per_epoch)
        perm = np.random.default_rng(np.random.SeedSequence([seed, e])).permutation(n)
        want.append((want[-1] if want else 0) + int(long[perm[t * batch:(t + 1) * batch]].sum()))
    assert [r["captions_cut"] for r in rows] == want  # cumulative, across the resume at step 1
    assert 0 < want[0] < want[1]
    assert [r["data_skipped"] for r in rows] == [1, 1]
