"""The streaming data path (trainer/data/stream.py): the share planner, the epoch order, the Parquet
reader and the prefetch thread, on real Parquet files and the committed sample. No Ray."""

from __future__ import annotations

import queue
import threading
import types

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import SAMPLE
from trainer.data import shards, stream
from trainer.data.mnist import DataError
from trainer.data.stream import Segment, epoch_chunks, plan_share, share_index

UNEVEN = [700, 1, 2500, 0, 999, 1300, 64, 4000]  # rows per file, a file of none among them


@pytest.mark.parametrize("world", range(1, 8))
@pytest.mark.parametrize("rows", [UNEVEN, [10_000] * 6, [3]])
def test_shares_are_equal_disjoint_and_cover_all_but_the_remainder(rows, world):
    shares = [plan_share(rows, world, rank) for rank in range(world)]
    indices = [share_index(s) for s in shares]
    assert {len(i) for i in indices} == {sum(rows) // world}  # equal
    together = np.concatenate(indices)
    assert len(np.unique(together)) == len(together)  # disjoint
    assert np.array_equal(np.sort(together), np.arange(world * (sum(rows) // world)))  # covering
    for segments in shares:  # each segment lies in its file, and its first row index is right
        for s in segments:
            assert 0 <= s.start < s.stop <= rows[s.file] and s.first == sum(rows[:s.file]) + s.start


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        plan_share([10], 2, 2)


def _memory_reader(rows):
    """A reader over in-memory files: row r of the split is an image whose first three pixels spell
    r (base 256), labelled r % 10."""
    offsets = np.cumsum([0, *rows])

    def read(segment: Segment):
        index = np.arange(offsets[segment.file] + segment.start, offsets[segment.file] + segment.stop)
        images = np.zeros((len(index), 28, 28), np.uint8)
        images[:, 0, :3] = np.stack([index & 255, (index >> 8) & 255, index >> 16], axis=1)
        return images, (index % 10).astype(np.uint8)
    return read


def _rows(chunks) -> np.ndarray:
    """The split's row index of every example in `chunks`, in order."""
    pixels = np.concatenate([x.reshape(-1, 784)[:, :3].astype(np.int64) for x, _ in chunks])
    return pixels[:, 0] + 256 * pixels[:, 1] + 65536 * pixels[:, 2]


def _epoch(rows, world, rank, batch, seed, steps_per_call=3, shuffle_rows=1000):
    segments = plan_share(rows, world, rank)
    steps = len(share_index(segments)) // batch
    chunks = list(epoch_chunks(_memory_reader(rows), segments, batch, steps, steps_per_call, seed, shuffle_rows))
    return chunks, steps, segments


@pytest.mark.parametrize("shuffle_rows", [1, 1000, 10**6])
def test_an_epoch_runs_every_step_at_the_batch_with_distinct_rows_of_the_share(shuffle_rows):
    chunks, steps, segments = _epoch(UNEVEN, 3, 1, batch=50, seed=(0, 1, 0), shuffle_rows=shuffle_rows)
    assert all(1 <= len(x) <= 3 and x.shape[1:] == (50, 28, 28) and y.shape == x.shape[:2] for x, y in chunks)
    assert sum(len(x) for x, _ in chunks) == steps
    rows, labels = _rows(chunks), np.concatenate([y.reshape(-1) for _, y in chunks])
    assert len(rows) == steps * 50 and np.array_equal(labels, rows % 10)  # each image keeps its label
    assert len(np.unique(rows)) == len(rows) and np.isin(rows, share_index(segments)).all()  # distinct, its own
    assert len(share_index(segments)) - len(rows) < 50  # only the last partial batch is dropped


def test_the_order_differs_every_epoch_and_repeats_with_the_seed():
    def order(seed):
        return _rows(_epoch([10_000] * 3, 2, 0, batch=64, seed=seed)[0])
    first, again, second = order((0, 0, 0)), order((0, 0, 0)), order((0, 0, 1))
    assert np.array_equal(first, again) and not np.array_equal(first, second)
    assert len(np.intersect1d(first, second)) > len(first) - 64  # the same share; the dropped rows vary
    # Shuffled across files, not only within one: the first step mixes rows of several of them, and
    # the files come in another order each epoch.
    files = [np.unique(_rows(_epoch([1000] * 10, 1, 0, batch=100, seed=(1, 0, e), shuffle_rows=5000)[0][:1]) // 1000)
             for e in range(2)]
    assert min(len(f) for f in files) >= 4 and not np.array_equal(files[0], files[1])


def test_a_share_shorter_than_its_steps_is_an_error():
    segments = plan_share([500], 1, 0)
    with pytest.raises(DataError, match="ran out after 0 of 6 steps"):
        list(epoch_chunks(_memory_reader([500]), segments, 100, 6, 1, (0,)))


@pytest.fixture(scope="module")
def sample():
    with np.load(SAMPLE) as npz:
        return npz["x_train"], npz["y_train"]


def _write(directory, sample, rows, row_group_size):
    """The sample's rows as Parquet files of `rows` rows each (the project's columns), in row groups."""
    x, y = sample
    files, start = [], 0
    for i, count in enumerate(rows):
        name = f"part-{i}.parquet"
        pq.write_table(shards._table(x[start:start + count], y[start:start + count], start), directory / name,
                       row_group_size=row_group_size)
        files.append({"path": name, "rows": count})
        start += count
    return files


def test_the_reader_returns_each_segments_rows_across_row_groups(tmp_path, sample):
    rows = [1100, 37, 1863]
    files = _write(tmp_path, sample, rows, row_group_size=256)
    assert pq.ParquetFile(tmp_path / "part-0.parquet").metadata.num_row_groups == 5
    read = stream.ShareReader(str(tmp_path), files)
    for world in (1, 2, 7):
        for rank in range(world):
            for segment in plan_share(rows, world, rank):
                images, labels = read(segment)
                rows_of = slice(segment.first, segment.first + segment.rows)
                assert np.array_equal(images, sample[0][rows_of]) and np.array_equal(labels, sample[1][rows_of])


def test_the_reader_refuses_files_that_disagree_with_the_manifest(tmp_path, sample):
    files = _write(tmp_path, sample, [1000, 1000], row_group_size=1000)
    with pytest.raises(DataError, match=r"part-1.parquet: 1000 rows, manifest says 999"):
        stream.ShareReader(str(tmp_path), [files[0], {**files[1], "rows": 999}])(Segment(1, 0, 10, 1000))
    swapped = stream.ShareReader(str(tmp_path), files[::-1])  # files out of order: their rows are not the plan's
    with pytest.raises(DataError, match=r"part-1.parquet: rows 0..10 are not rows 0..10 of the split"):
        swapped(Segment(0, 0, 10, 0))
    (tmp_path / "part-0.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="part-0.parquet: unreadable Parquet shard"):
        stream.ShareReader(str(tmp_path), files)(Segment(0, 0, 10, 0))


def test_prefetch_keeps_the_order_stays_bounded_and_passes_errors_on(monkeypatch):
    made = []
    refused = threading.Semaphore(0)

    class WatchedQueue(queue.Queue):
        """Prefetch's queue, telling each time a put found it full (the thread waits, then retries)."""

        def put(self, item, block=True, timeout=None):
            try:
                super().put(item, block, timeout)
            except queue.Full:
                refused.release()
                raise

    monkeypatch.setattr(stream, "queue", types.SimpleNamespace(Queue=WatchedQueue, Full=queue.Full))

    def items(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise DataError("shard 3 is unreadable")
            made.append(i)
            yield i

    with stream.Prefetch(items(50), depth=4) as ahead:
        assert list(ahead) == list(range(50))
    made.clear()
    while refused.acquire(blocking=False):  # what the first run counted
        pass
    ahead = stream.Prefetch(items(1000), depth=4)
    try:
        # Nobody takes from it: the thread fills the queue (4 items), makes one more and finds the
        # queue full; still full at its retry, it has made nothing since (no item dropped, none read ahead).
        for _ in range(2):
            assert refused.acquire(timeout=120), "the prefetch thread never found its queue full"
        assert made == list(range(4 + 1))  # the queue's depth, plus the item waiting to go in
    finally:
        ahead.close()  # leaving early stops the thread
    assert made == list(range(4 + 1))
    assert not any(t.name == "data-prefetch" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(DataError, match="shard 3 is unreadable"), stream.Prefetch(items(10, fail_at=3)) as ahead:
        list(ahead)
