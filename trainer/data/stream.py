"""The streaming data path: each worker reads its own share of the Parquet files, a shuffle buffer
at a time, so no process ever holds the training split (trainer/train/driver.py picks this path by size).

    manifest (files, rows) -> plan_share: rank's equal, contiguous rows, as file segments
    -> every epoch: segments in a seeded order -> shuffle buffer -> (steps, batch) chunks
    -> Prefetch: a thread reads and shuffles ahead of the steps, a bounded queue between them

"Shuffled" at this size means: a worker's share is fixed for the run (as with the in-memory path);
each epoch visits its file segments in a new order, and rows are mixed within a buffer of at least
SHUFFLE_ROWS rows. Pure numpy and pyarrow: nothing here knows about Ray or TensorFlow.
"""

from __future__ import annotations

import posixpath
import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trainer.common.fs import filesystem
from trainer.data.mnist import IMAGE_SHAPE, DataError
from trainer.data.shards import images_from_column

SHUFFLE_ROWS = 100_000  # rows mixed at once (78 MB of images): one or more whole segments
PREFETCH_CHUNKS = 4  # chunks (steps_per_call steps each) read and shuffled ahead of training


@dataclass(frozen=True)
class Segment:
    """Rows start..stop (end excluded) of file number `file`; `first` is the first one's row index in the split."""
    file: int
    start: int
    stop: int
    first: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_share(rows: Sequence[int], world: int, rank: int) -> list[Segment]:
    """Rank's share of files holding `rows` rows each, in order: rows [rank*n, (rank+1)*n) of the
    split, n = total // world. Equal and disjoint; together they cover all but total % world rows."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    share = sum(rows) // world
    lo, hi = rank * share, (rank + 1) * share
    segments, offset = [], 0
    for file, count in enumerate(rows):
        start, stop = max(lo, offset), min(hi, offset + count)
        if start < stop:
            segments.append(Segment(file, start - offset, stop - offset, start))
        offset += count
    return segments


def share_index(segments: Iterable[Segment]) -> np.ndarray:
    """The split's row indices a share covers (what the shard check of metrics.json counts)."""
    return np.concatenate([np.arange(s.first, s.first + s.rows, dtype=np.int64) for s in segments] or
                          [np.zeros(0, np.int64)])


def epoch_chunks(read: Callable[[Segment], tuple[np.ndarray, np.ndarray]], segments: Sequence[Segment],
                 batch: int, steps: int, steps_per_call: int, seed: tuple,
                 shuffle_rows: int = SHUFFLE_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of a share: (k, batch, 28, 28) images and (k, batch) labels, k <= steps_per_call,
    `steps` steps in all; rows past steps * batch are dropped. Segments in an order drawn from
    `seed`, then rows shuffled within a buffer of at least `shuffle_rows` (leftovers carry over).
    Memory: the buffer, one segment being read into it, and the chunks handed out."""
    rng = np.random.default_rng(seed)
    chunk_rows, done = steps_per_call * batch, 0
    carry_x, carry_y = np.zeros((0, *IMAGE_SHAPE), np.uint8), np.zeros(0, np.uint8)
    pending = [segments[i] for i in rng.permutation(len(segments))]
    while done < steps:
        taken = []
        while pending and len(carry_x) + sum(s.rows for s in taken) < max(shuffle_rows, chunk_rows):
            taken.append(pending.pop(0))
        size = len(carry_x) + sum(s.rows for s in taken)
        if size < (steps - done) * batch and not pending:
            raise DataError(f"the share ran out after {done} of {steps} steps: fewer rows than planned")
        pool_x, pool_y = np.empty((size, *IMAGE_SHAPE), np.uint8), np.empty(size, np.uint8)
        pool_x[:len(carry_x)], pool_y[:len(carry_y)], at = carry_x, carry_y, len(carry_x)
        for segment in taken:  # read straight into the buffer: one segment's table at a time
            x, y = read(segment)
            pool_x[at:at + len(x)], pool_y[at:at + len(x)], at = x, y, at + len(x)
        order, used = rng.permutation(size), 0
        usable = size - (size % chunk_rows if pending else 0)  # at the end, every full batch goes
        while usable - used >= batch and done < steps:
            k = min(steps_per_call, steps - done, (usable - used) // batch)
            rows = order[used:used + k * batch]  # a gather: a chunk is its own small array
            yield pool_x[rows].reshape(k, batch, *IMAGE_SHAPE), pool_y[rows].reshape(k, batch)
            used, done = used + k * batch, done + k
        carry_x, carry_y = pool_x[order[used:]], pool_y[order[used:]]


class ShareReader:
    """Reads segments of the split's Parquet files (a local path or a pyarrow URI), checking each
    file's rows against the manifest and each segment's row indices against the plan."""

    def __init__(self, path: str, files: Sequence[dict]):
        self.path, self.files = path, list(files)
        self._fs, self._root = filesystem(path)

    def __call__(self, segment: Segment) -> tuple[np.ndarray, np.ndarray]:
        name = self.files[segment.file]["path"]
        where = f"{self.path}/{name}"
        try:
            parquet = pq.ParquetFile(posixpath.join(self._root, name), filesystem=self._fs)
            if parquet.metadata.num_rows != self.files[segment.file]["rows"]:
                raise DataError(f"{where}: {parquet.metadata.num_rows} rows, manifest says "
                                f"{self.files[segment.file]['rows']}")
            meta = parquet.metadata
            starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
            groups = [g for g in range(meta.num_row_groups)  # only the row groups that hold the segment
                      if starts[g] < segment.stop and starts[g + 1] > segment.start]
            table = parquet.read_row_groups(groups, columns=["index", "image", "label"])
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{where}: unreadable Parquet shard ({exc})") from None
        table = table.slice(segment.start - starts[groups[0]], segment.rows)
        index = table.column("index").to_numpy()
        if len(index) != segment.rows or index[0] != segment.first or index[-1] != segment.first + segment.rows - 1:
            raise DataError(f"{where}: rows {segment.start}..{segment.stop} are not rows "
                            f"{segment.first}..{segment.first + segment.rows} of the split")
        return images_from_column(table.column("image")), table.column("label").to_numpy().astype(np.uint8)


class Prefetch:
    """Iterates `chunks` on a thread, at most `depth` ahead: reading and shuffling overlap the steps.
    The thread's exception is raised here; leaving early (close, or the with block) stops it."""

    def __init__(self, chunks: Iterator, depth: int = PREFETCH_CHUNKS):
        self._queue, self._stop = queue.Queue(depth), threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(chunks,), name="data-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, chunks: Iterator) -> None:
        try:
            for item in chunks:
                if not self._put(("item", item)):
                    return
            self._put(("end", None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(("error", exc))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
