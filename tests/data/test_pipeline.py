"""TrainLoader's determinism/resume/sharding contract and eval_batches' coverage."""
import numpy as np
import pytest

from clrjax.data.pipeline import TrainLoader, epoch_permutation, eval_batches, num_eval_batches
from clrjax.data.sources import ArraySource


def make_source(n=50, shape=(4, 4, 1)):
    # image of example i is filled with i (mod 256): the content identifies the row
    images = (np.arange(n)[:, None, None, None] % 256 * np.ones((1,) + shape)).astype(np.uint8)
    return ArraySource(images, np.arange(n) % 7, num_classes=7)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batch_fixed_by_seed_and_step():
    src = make_source()
    a = TrainLoader(src, 8, seed=3, prefetch=0)
    b = TrainLoader(src, 8, seed=3, prefetch=2)
    with a, b:
        for x, y in zip(take(a, 10), take(b, 10)):
            for k in ("image", "label", "index"):
                np.testing.assert_array_equal(x[k], y[k])
    other = TrainLoader(src, 8, seed=4, prefetch=0)
    assert not np.array_equal(other.global_rows(0), a.global_rows(0))


def test_batch_contents_match_rows_and_counter():
    src = make_source()
    loader = TrainLoader(src, 8, seed=0, prefetch=0)
    for step in (0, 5, 6, 13):
        batch, rows = loader.batch_at(step), loader.global_rows(step)
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], rows)
        np.testing.assert_array_equal(batch["label"], rows % 7)
        np.testing.assert_array_equal(batch["index"], step * 8 + np.arange(8))
        assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
        assert batch["index"].dtype == np.int32


def test_epochs_are_distinct_permutations_without_remainder():
    src = make_source(50)
    loader = TrainLoader(src, 8, seed=0, prefetch=0)
    assert loader.steps_per_epoch == 6  # 50 // 8, the 2 left-over examples are dropped
    epochs = [np.concatenate([loader.global_rows(e * 6 + t) for t in range(6)]) for e in range(3)]
    for rows, e in zip(epochs, range(3)):
        assert len(set(rows.tolist())) == 48  # no example twice within an epoch
        np.testing.assert_array_equal(rows, epoch_permutation(50, 0, e)[:48])
    assert not np.array_equal(epochs[0], epochs[1])
    assert not np.array_equal(epochs[1], epochs[2])


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_gives_identical_remaining_stream(prefetch):
    src = make_source()
    with TrainLoader(src, 8, seed=1, prefetch=prefetch) as first:
        take(first, 7)  # crosses no boundary yet; the rest crosses epochs 1 -> 2
        state = first.state()
        rest = take(first, 9)
    assert state == {"step": 7}
    with TrainLoader(src, 8, seed=1, start_step=state["step"], prefetch=prefetch) as resumed:
        again = take(resumed, 9)
    for x, y in zip(rest, again):
        for k in ("image", "label", "index"):
            np.testing.assert_array_equal(x[k], y[k])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_process_shards_concatenate_to_global_batch(processes):
    src = make_source(64)
    reference = TrainLoader(src, 16, seed=2, prefetch=0)
    loaders = [TrainLoader(src, 16, seed=2, process_index=p, process_count=processes, prefetch=1)
               for p in range(processes)]
    streams = [take(loader, 6) for loader in loaders]  # 6 steps cross the epoch boundary (4 per epoch)
    for loader in loaders:
        loader.close()
    for step in range(6):
        want = reference.batch_at(step)
        for k in ("image", "label", "index"):
            got = np.concatenate([streams[p][step][k] for p in range(processes)])
            np.testing.assert_array_equal(got, want[k])
        assert streams[0][step]["image"].shape[0] == 16 // processes


def test_invalid_batch_settings_raise_clear_errors():
    src = make_source(10)
    with pytest.raises(ValueError, match="larger than the dataset"):
        TrainLoader(src, 16, seed=0)
    with pytest.raises(ValueError, match="multiple of the process count"):
        TrainLoader(src, 6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        TrainLoader(src, 8, seed=0, process_index=2, process_count=2)


def test_source_error_in_prefetch_thread_is_raised_and_close_stops_thread():
    class Broken(ArraySource):
        def __getitem__(self, index):
            raise OSError("disk gone")

    loader = TrainLoader(Broken(make_source().images, make_source().labels), 8, seed=0, prefetch=2)
    with pytest.raises(OSError, match="disk gone"):
        next(loader)
    loader.close()

    loader = TrainLoader(make_source(), 8, seed=0, prefetch=2)
    next(loader)
    thread = loader._prefetcher._thread
    loader.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        next(loader)


@pytest.mark.parametrize("n,batch,processes", [(50, 16, 1), (50, 16, 2), (50, 16, 4), (48, 16, 2), (3, 8, 4)])
def test_eval_batches_cover_every_example_exactly_once(n, batch, processes):
    src = make_source(n)
    per_process = [list(eval_batches(src, batch, p, processes)) for p in range(processes)]
    assert {len(b) for b in per_process} == {num_eval_batches(n, batch)}
    seen = []
    for k in range(num_eval_batches(n, batch)):
        parts = [per_process[p][k] for p in range(processes)]
        mask = np.concatenate([b["mask"] for b in parts])
        index = np.concatenate([b["index"] for b in parts])
        image = np.concatenate([b["image"] for b in parts])
        assert mask.dtype == bool and parts[0]["image"].shape[0] == batch // processes
        np.testing.assert_array_equal(image[mask][:, 0, 0, 0], index[mask])  # rows are the claimed examples
        seen.extend(index[mask].tolist())
    assert seen == list(range(n))  # fixed dataset order, nothing dropped or repeated
