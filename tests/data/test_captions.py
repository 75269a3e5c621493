"""Image-caption data: CSV/TSV and tar-shard captions, several per image, the 'text' field of the loader.

The captions name their example and variant ("k7 v2 ..."), so decoding a batch's tokens says which
example and which of its captions each row holds: that is how the tests check determinism across
process counts and resumes without trusting the loader's own bookkeeping.
"""
import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from clrjax import config as config_lib
from clrjax.data import captions
from clrjax.data.pipeline import TrainLoader
from clrjax.data.sources import ArraySource, DataError, load_source
from clrjax.data.tokenizers import ByteTokenizer

N, VARIANTS, L = 24, 3, 24
TOK = ByteTokenizer(L)


def _image(k):
    return (np.arange(64, dtype=np.uint8).reshape(8, 8) * 3 + k * 7).astype(np.uint8)


def _png(k):
    buf = io.BytesIO()
    Image.fromarray(_image(k)).save(buf, format="PNG")
    return buf.getvalue()


def _caption(k, v):
    return f"k{k} v{v} ünï"  # non-ASCII on purpose: byte tokens round trip


def _parse(row):
    """Token row -> (example k, variant v) from its caption."""
    k, v = TOK.decode(row).split()[:2]
    return int(k[1:]), int(v[1:])


def _cfg(path, **kw):
    base = dict(name="csv", path=str(path), image_size=0, channels=1, on_error="fail", decode_workers=2,
                decode_processes=0, shuffle_buffer=8, split_fraction=0.0, train_split="train", test_split="test",
                class_names=(), host_crop="center", caption_column="caption")
    base.update(kw)
    return base


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for k in range(N):
        (root / f"{k:03d}.png").write_bytes(_png(k))
    return root


def _write_table(path, images_dir, delimiter=",", column="caption", multi="rows"):
    """Example k has VARIANTS captions: as repeated rows (multi='rows') or a JSON list in one cell ('json')."""
    lines = [delimiter.join(["path", "label", column])]
    for k in range(N):
        rel = os.path.relpath(images_dir / f"{k:03d}.png", path.parent)
        if multi == "json":
            cell = '"[' + ", ".join(f'""{_caption(k, v)}""' for v in range(VARIANTS)) + ']"'
            lines.append(delimiter.join([rel, str(k % 3), cell]))
        else:
            lines += [delimiter.join([rel, str(k % 3), _caption(k, v)]) for v in range(VARIANTS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _write_shards(root, sizes=(7, 9, 8), json_every=2, corrupt=()):
    """Tar shards key.png + key.cls + key.txt; every second .txt is a JSON list of all captions, else one."""
    os.makedirs(root, exist_ok=True)
    k = 0
    for s, n in enumerate(sizes):
        with tarfile.open(os.path.join(root, f"shard-{s:03d}.tar"), "w") as tar:
            for _ in range(n):
                key = f"{k:06d}"
                text = ("[" + ", ".join(f'"{_caption(k, v)}"' for v in range(VARIANTS)) + "]"
                        if k % json_every == 0 else _caption(k, 0))
                image = b"not a png" if k in corrupt else _png(k)
                for name, data in ((f"{key}.png", image), (f"{key}.cls", str(k % 3).encode()),
                                   (f"{key}.txt", text.encode("utf-8"))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                k += 1
    return os.path.join(root, "shard-{000..%03d}.tar" % (len(sizes) - 1))


def _stream(source, batch, seed, steps, process_count=1, start=0, prefetch=0):
    """Per step: the (k, v) of every row, processes concatenated in order (the global batch)."""
    out = {}
    loaders = [TrainLoader(source, batch, seed, process_index=p, process_count=process_count, start_step=start,
                           prefetch=prefetch, tokenizer=TOK) for p in range(process_count)]
    try:
        for step in range(start, start + steps):
            rows = []
            for ld in loaders:
                b = next(ld)
                assert b["text"].dtype == np.int32 and b["text"].shape == (batch // process_count, L)
                for image, label, row in zip(b["image"], b["label"], b["text"]):
                    k, v = _parse(row)
                    np.testing.assert_array_equal(image[..., 0], _image(k))  # the caption is its image's
                    assert label == k % 3
                    rows.append((k, v))
            out[step] = rows
    finally:
        for ld in loaders:
            ld.close()
    return out


# --------------------------------------------------------------------------- parsing and choosing


def test_parse_captions():
    assert captions.parse_captions('  ["a dog", " a brown dog ", ""] ') == ["a dog", "a brown dog"]
    assert captions.parse_captions(" a dog \n") == ["a dog"]
    assert captions.parse_captions("[not json") == ["[not json"]
    assert captions.parse_captions("[1, 2]") == ["[1, 2]"]  # not a list of strings: one caption
    assert captions.parse_captions(" \n ") == []


def test_caption_choice_is_a_function_of_seed_epoch_and_example():
    ids = np.arange(4000)
    counts = np.full(4000, 5)
    a = captions.caption_choice(0, 0, ids, counts)
    assert a.min() == 0 and a.max() == 4 and a.dtype == np.int64
    np.testing.assert_array_equal(a[::-1], captions.caption_choice(0, 0, ids[::-1], counts))  # per example
    np.testing.assert_array_equal(a[1000:1010], captions.caption_choice(0, 0, ids[1000:1010], counts[:10]))
    assert (a != captions.caption_choice(0, 1, ids, counts)).mean() > 0.7  # a new epoch draws again
    assert (a != captions.caption_choice(1, 0, ids, counts)).mean() > 0.7
    # about uniform: each of 5 captions ~800 times (binomial sd ~25)
    assert np.all(np.abs(np.bincount(a, minlength=5) - 800) < 150)
    assert (captions.caption_choice(3, 2, ids, np.ones(4000, np.int64)) == 0).all()


# --------------------------------------------------------------------------- CSV / TSV


@pytest.mark.parametrize("delimiter,multi", [(",", "rows"), ("\t", "json")])
def test_table_captions_several_per_image(tmp_path, images_dir, delimiter, multi):
    name = "csv" if delimiter == "," else "tsv"
    path = _write_table(tmp_path / f"list.{name}", images_dir, delimiter, column="text", multi=multi)
    src = load_source(_cfg(path, name=name, caption_column="text"), "train")
    assert len(src) == N and src.has_captions  # repeated rows of one image are one example
    assert src.captions_of([5, 0]) == [[_caption(5, v) for v in range(VARIANTS)],
                                       [_caption(0, v) for v in range(VARIANTS)]]
    np.testing.assert_array_equal(src.labels, np.arange(N) % 3)


def test_table_without_caption_column_keeps_examples_apart(tmp_path, images_dir):
    path = _write_table(tmp_path / "list.csv", images_dir)
    plain = load_source(_cfg(path, caption_column=""), "train")
    assert len(plain) == N * VARIANTS and not getattr(plain, "has_captions", False)
    with pytest.raises(ValueError, match="the dataset has no captions; set --config.dataset.caption_column"):
        TrainLoader(plain, 8, 0, tokenizer=TOK)


def test_csv_text_field_same_for_one_and_two_processes_and_after_resume(tmp_path, images_dir):
    src = load_source(_cfg(_write_table(tmp_path / "list.csv", images_dir)), "train")
    one = _stream(src, 8, seed=5, steps=9)  # 3 steps an epoch: 3 epochs
    two = _stream(src, 8, seed=5, steps=9, process_count=2, prefetch=2)
    assert one == two
    resumed = _stream(src, 8, seed=5, steps=4, start=5)
    assert all(resumed[s] == one[s] for s in resumed)
    # every example once an epoch, and its caption drawn per epoch: over 3 epochs, variants change
    for epoch in range(3):
        assert sorted(k for s in range(3 * epoch, 3 * epoch + 3) for k, _ in one[s]) == list(range(N))
    per_example = {}
    for s in one:
        for k, v in one[s]:
            per_example.setdefault(k, set()).add(v)
    assert sum(len(v) > 1 for v in per_example.values()) > N // 3
    # the variant is the documented function of (seed, epoch, example)
    for s in one:
        for k, v in one[s]:
            assert v == captions.caption_choice(5, s // 3, [k], [VARIANTS])[0]


def test_missing_caption_column_and_empty_caption(tmp_path, images_dir):
    path = _write_table(tmp_path / "list.csv", images_dir)
    with pytest.raises(DataError, match=r"list.csv: the header row names the columns \['path', 'label', 'caption'\] "
                                        r"but not config.dataset.caption_column='text'; name the caption column"):
        load_source(_cfg(path, caption_column="text"), "train")
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = lines[4].rsplit(",", 1)[0] + ",  "
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"list.csv line 5: has an empty 'caption' caption for '.*001.png'; write the "
                                        r"caption, or set --config.dataset.on_error=skip"):
        load_source(_cfg(path), "train")
    skipped = load_source(_cfg(path, on_error="skip"), "train")
    assert skipped.num_skipped == 1 and len(skipped) == N
    assert len(skipped.captions_of([1])[0]) == VARIANTS - 1


def test_caption_follows_a_replaced_image(tmp_path, images_dir):
    import shutil
    local = tmp_path / "images"
    shutil.copytree(images_dir, local)
    (local / "004.png").write_bytes(b"not a png")
    src = load_source(_cfg(_write_table(tmp_path / "list.csv", local), on_error="skip"), "train")
    with TrainLoader(src, 8, 1, prefetch=0, tokenizer=TOK) as ld:
        batch = ld.batch_at(next(s for s in range(3) if 4 in ld.local_rows(s)))
    for image, row in zip(batch["image"], batch["text"]):
        k, _ = _parse(row)
        assert k != 4
        np.testing.assert_array_equal(image[..., 0], _image(k))
    assert src.num_skipped == 1


# --------------------------------------------------------------------------- tar shards


def test_tar_captions_from_txt_members(tmp_path):
    pattern = _write_shards(str(tmp_path / "shards"))
    src = load_source(_cfg(pattern, name="webdataset", caption_column="txt"), "train")
    assert len(src) == N and src.has_captions
    assert src.captions_of([0, 1]) == [[_caption(0, v) for v in range(VARIANTS)], [_caption(1, 0)]]


def test_tar_text_field_per_process_count_and_resume(tmp_path):
    src = load_source(_cfg(_write_shards(str(tmp_path / "shards")), name="webdataset", caption_column="txt"),
                      "train")
    for processes in (1, 2):
        full = _stream(src, 8, seed=2, steps=6, process_count=processes, prefetch=2)
        resumed = _stream(src, 8, seed=2, steps=3, process_count=processes, start=3)
        assert all(resumed[s] == full[s] for s in resumed)
        # the caption of example k in epoch e does not depend on the process count (its batch does)
        for s, rows in full.items():
            for k, v in rows:
                counts = VARIANTS if k % 2 == 0 else 1
                assert v == captions.caption_choice(2, s // 3, [k], [counts])[0]


def test_tar_caption_follows_a_replaced_image(tmp_path):
    """on_error=skip: the stream replaces an undecodable image by another sample; _stream checks that every
    row's caption names the image the row holds, and sample 5 never appears."""
    pattern = _write_shards(str(tmp_path / "shards"), corrupt={5})
    src = load_source(_cfg(pattern, name="webdataset", caption_column="txt", on_error="skip"), "train")
    for processes in (1, 2):
        rows = _stream(src, 8, seed=0, steps=3, process_count=processes, prefetch=2)
        assert 5 not in {k for step in rows.values() for k, _ in step}
    assert src.num_skipped == 1


def test_tar_missing_or_empty_txt_and_wrong_column(tmp_path):
    root = str(tmp_path / "shards")
    pattern = _write_shards(root, sizes=(6,))
    shard = os.path.join(root, "shard-000.tar")
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name == "000002.txt":
                continue
            if m.name == "000003.txt":
                data = b""
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    with pytest.raises(DataError, match=r"shard-000.tar:000002.png: has no .txt caption "
                                        r"\(config.dataset.caption_column=txt\); add the sample's .txt file"):
        load_source(_cfg(pattern, name="webdataset", caption_column="txt"), "train")
    src = load_source(_cfg(pattern, name="webdataset", caption_column="txt", on_error="skip"), "train")
    assert len(src) == 4 and src.errors.by_kind == {"missing_caption": 1, "empty_caption": 1}
    with pytest.raises(DataError, match="config.dataset.caption_column is 'caption' but webdataset captions are "
                                        "the .txt members; set --config.dataset.caption_column=txt."):
        load_source(_cfg(pattern, name="webdataset", caption_column="caption"), "train")


# --------------------------------------------------------------------------- in memory, config


def test_array_source_captions():
    images = np.stack([_image(k) for k in range(N)])[..., None]
    src = ArraySource(images, np.arange(N) % 3, captions=[[_caption(k, v) for v in range(VARIANTS)]
                                                          if k % 2 else _caption(k, 0) for k in range(N)])
    assert src.captions_of([1, 2]) == [[_caption(1, v) for v in range(VARIANTS)], [_caption(2, 0)]]
    one, two = _stream(src, 8, seed=0, steps=6), _stream(src, 8, seed=0, steps=6, process_count=2)
    assert one == two
    with pytest.raises(DataError, match="example 1 has no caption"):
        ArraySource(images[:2], np.zeros(2), captions=["a", " "])


def test_tokenizer_for_the_trainer():
    c = config_lib.base_config()
    assert captions.tokenizer_for(c) is None
    c.dataset.caption_column, c.text.context_length = "caption", 33
    tok = captions.tokenizer_for(c)
    assert isinstance(tok, ByteTokenizer) and tok.context_length == 33


def _config(**fields):
    c = config_lib.base_config()
    for dotted, value in fields.items():
        section, leaf = dotted.split(".")
        c[section][leaf] = value
    return c


@pytest.mark.parametrize("fields,message", [
    ({"dataset.caption_column": "caption"},
     "config.dataset.caption_column is 'caption' but digits has no captions; use a dataset with captions "
     "(csv, tsv, webdataset, a TFDS dataset with a caption feature) or set --config.dataset.caption_column=''."),
    ({"text.tokenizer": "sentencepiece"},
     "config.text.vocab_file is empty but text.tokenizer is 'sentencepiece'; set --config.text.vocab_file to a "
     "SentencePiece .model file (or text.tokenizer=bytes)."),
    ({"text.tokenizer": "sentencepiece", "text.vocab_file": "/nonexistent/spm.model"},
     "config.text.vocab_file is '/nonexistent/spm.model', which does not exist; set --config.text.vocab_file to "
     "a SentencePiece .model file."),
    ({"text.context_length": 2},
     "config.text.context_length is 2 but must be a whole number >= 3; set --config.text.context_length to a "
     "whole number >= 3 (sot, a token, eot) such as 77."),
    ({"text.tokenizer": "wordpiece"}, "config.text.tokenizer is 'wordpiece', which is not supported; use one of "
                                      "bytes, sentencepiece, bpe."),
    ({"text.tokenizer": "bpe", "text.vocab_file": "/nonexistent/tokenizer.json"},
     "config.text.vocab_file is '/nonexistent/tokenizer.json', which does not exist; set --config.text.vocab_file "
     "to a tokenizers tokenizer.json file."),
])
def test_text_config_validation(fields, message):
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate_config(_config(**fields))
    assert str(err.value) == message


# --------------------------------------------------------------------------- TFDS (a fake in memory)
# No captioned TFDS dataset can be built offline here (tfds build needs TensorFlow and the download),
# so these tests give a TfdsSource an in-memory list of records shaped as tfds' coco_captions decodes
# them: {'image': uint8 [H, W, C], 'captions': {'id': int64 [n], 'text': bytes [n]}, 'label': int}.


def _fake_tfds(n=N):
    from clrjax.data.sources import TfdsSource

    records = [{"image": _image(k)[..., None], "label": k % 3,
                "captions": {"id": np.arange(VARIANTS), "text": np.asarray(
                    [_caption(k, v).encode() for v in range(VARIANTS)], dtype=object)}} for k in range(n)]
    src = object.__new__(TfdsSource)
    src._ds = src._text_ds = records  # captions_of reads _text_ds (the image-skipping data source)
    src._image_key, src._label_key, src._resize_to = "image", "label", 0
    src.image_shape, src.num_classes, src._num_threads = (8, 8, 1), 3, 2
    src._pool, src._pool_lock = None, __import__("threading").Lock()
    src.caption_key = "captions/text"
    return src


def test_tfds_caption_feature_of_a_record():
    from clrjax.data.sources import captions_from_example

    record = _fake_tfds(2)._ds[1]
    assert captions_from_example(record, "captions/text") == [_caption(1, v) for v in range(VARIANTS)]
    assert captions_from_example({"caption": b'["a", "b"]'}, "caption") == ["a", "b"]
    assert captions_from_example({"caption": np.asarray(" one ")}, "caption") == ["one"]


def test_tfds_text_field_through_the_grain_reader():
    src = _fake_tfds()
    assert src.has_captions
    with TrainLoader(src, 8, 4, tokenizer=TOK) as ld:
        assert ld.reader == "grain"
    grain = _stream(src, 8, seed=4, steps=6, prefetch=2)  # reader 'auto' = grain for TFDS sources
    two = _stream(src, 8, seed=4, steps=6, process_count=2)
    assert grain == two
    for s, rows in grain.items():
        for k, v in rows:
            assert v == captions.caption_choice(4, s // 3, [k], [VARIANTS])[0]


# --------------------------------------------------------------------------- two real processes


def test_text_travels_like_label_across_two_processes(tmp_path):
    """launch/local.py: 2 processes x 4 CPU devices, jax.distributed on localhost; the global 'text'
    array the devices hold equals the one-process loader's global batch."""
    import subprocess
    import sys

    from tests.data.captions_worker import captioned_source

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = tmp_path / "global.npz"
    proc = subprocess.run([sys.executable, os.path.join(root, "launch", "local.py"), "--num_processes=2",
                           "--devices_per_process=4", os.path.join(root, "tests", "data", "captions_worker.py"),
                           f"--out={out}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = np.load(out)
    with TrainLoader(captioned_source(), 16, 7, tokenizer=ByteTokenizer(24)) as loader:
        for step in range(4):
            want = next(loader)
            for key in ("text", "label", "index"):
                np.testing.assert_array_equal(got[f"{key}_{step}"], want[key])
            texts = [ByteTokenizer().decode(row) for row in want["text"]]
            ids = [int(t.split()[1]) for t in texts]
            np.testing.assert_array_equal(ids, loader.local_rows(step))  # each row's own caption
    # captions_cut of each process = its rows' captions longer than 21 tokens (examples >= 10), gathered
    with TrainLoader(captioned_source(), 16, 7, tokenizer=ByteTokenizer(24)) as loader:
        ids = np.concatenate([[int(ByteTokenizer().decode(r).split()[1]) for r in next(loader)["text"]]
                              for _ in range(3)]).reshape(3, 2, 8)  # step, process, row
    np.testing.assert_array_equal(got["cut_per_process"], (ids >= 10).sum(axis=(0, 2)))
    np.testing.assert_array_equal(got["combined"], [100 + (ids >= 10).sum(), 5 + 3])


def test_coco_captions_entry(tmp_path):
    """Registered as unlabelled TFDS data with captions/text; offline it fails as unprepared, naming the fix."""
    from clrjax.data import datasets

    entry = datasets.get("coco_captions")
    assert "caption" in entry.yields
    with pytest.raises(DataError, match=r"TFDS dataset 'coco_captions' is not prepared in .*tfds build coco_captions"):
        load_source({"name": "coco_captions", "data_dir": str(tmp_path), "caption_column": ""}, "train")
    src = _fake_tfds(2)
    src._label_key = ""  # unlabelled, as coco_captions: every label 0
    assert src.decode(src._ds[1])[1] == 0
    c = config_lib.base_config()
    c.dataset.name = "coco_captions"
    config_lib.validate_config(c)  # caption_column may stay empty: the entry names its feature
