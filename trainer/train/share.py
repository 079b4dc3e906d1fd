"""This worker's share of the data as the step takes it: (steps, batch) uint8 chunks for each epoch,
from Ray Data's shard held in memory, or streamed from its Parquet files (trainer/data/stream.py)."""

from __future__ import annotations

import contextlib

import numpy as np

from trainer.config import Config
from trainer.data import stream
from trainer.data.shards import images_from_column


def open_share(cfg: Config, source, world: int, rank: int):
    """This worker's data: (its rows' indices in the split, epoch_data(batch, steps, seed): a context
    manager giving one epoch's (steps, batch) chunks, at most --steps-per-call steps each).
    `source` is Ray Data's shard (the in-memory path: read once, kept) or the streaming path's
    {"path", "files"} (trainer/data/stream.py: read every epoch, a shuffle buffer at a time)."""
    if not isinstance(source, dict):
        images, labels, index = read_shard(source)
        return index, lambda batch, steps, seed: contextlib.nullcontext(
            chunked(images, labels, batch, seed, steps, cfg.steps_per_call))
    segments = stream.plan_share([f["rows"] for f in source["files"]], world, rank)
    read = stream.ShareReader(source["path"], source["files"])
    return stream.share_index(segments), lambda batch, steps, seed: stream.Prefetch(
        stream.epoch_chunks(read, segments, batch, steps, cfg.steps_per_call, seed))


def chunked(images, labels, batch: int, seed: tuple, steps: int, steps_per_call: int):
    """epoch_batches' arrays, made when the epoch starts (its clock includes the shuffle), in chunks
    of at most steps_per_call steps (views)."""
    xs, ys = epoch_batches(images, labels, batch, seed, steps)
    for i in range(0, len(xs), steps_per_call):
        yield xs[i:i + steps_per_call], ys[i:i + steps_per_call]


def read_shard(shard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Materialize this worker's Ray Data shard once, in memory: (images, labels, row indices)."""
    parts = list(shard.iter_batches(batch_size=10_000, batch_format="numpy"))
    if not parts:
        raise RuntimeError("this worker's data shard is empty; use fewer workers or more data")
    images = np.concatenate([images_from_column(p["image"]) for p in parts])
    labels = np.concatenate([p["label"] for p in parts]).astype(np.uint8)
    index = np.concatenate([p["index"] for p in parts]).astype(np.int64)
    return images, labels, index


def epoch_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, seed: tuple, steps: int | None = None):
    """One epoch, shuffled by `seed` and cut into (steps, batch, 28, 28) images and (steps, batch)
    labels, uint8; `steps` (default: as many as fit) is what every worker runs, the rest is dropped.
    No tf.data: under MultiWorkerMirroredStrategy deleting a tf.data iterator took about 2 s at each
    epoch's end (measured on 2 cores), so the steps take their batches straight from these arrays."""
    steps = len(images) // batch_size if steps is None else steps
    order = np.random.default_rng(seed).permutation(len(images))[:steps * batch_size]
    return images[order].reshape(steps, batch_size, *images.shape[1:]), labels[order].reshape(steps, batch_size)
