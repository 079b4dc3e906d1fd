"""The validation split a search scores its trials on: rows held out of the *training* split, seeded.

A search that picked its winner by test accuracy would tune on the test split. So the trials train
and score on a data set of their own, derived from the source and written once per (content, rows,
seed) like the job's shards:

    <cache>/tune-<content hash>-val<rows>-seed<seed>/
        train/  the training split less the held-out rows (in their order)
        test/   the held-out rows: the trials' validation split, under the name the workers read

The source's test split is not in it: no trial can see a test image. The held-out rows are the
first `rows` of a seeded permutation of the training rows, so the same seed picks the same rows on
any machine (numpy's PCG64). `Holdout` is what the search records about them.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

import numpy as np

from trainer.common.fs import join
from trainer.data import shards
from trainer.data.manifest import Manifest
from trainer.data.mnist import DataError, Mnist

SEED = 0
ROWS = 5_000  # 1/12 of MNIST's 60,000: a 0.1-point accuracy difference is 5 images; training keeps 55,000
SPLIT = "test"  # the name the held-out rows go by in the derived data set (what the workers read)


@dataclass(frozen=True)
class Holdout:
    """The validation split, as results.json records it."""
    rows: int
    seed: int
    source_sha256: str  # the source's content (both splits)
    index_sha256: str  # sha256 of the held-out training-row indices, sorted, as int64
    path: str  # the derived data set: its train split without these rows, and these rows as "test"
    content_sha256: str  # the derived data set's content hash
    train_rows: int

    def to_json(self) -> dict:
        return asdict(self)


def held_out(train_rows: int, rows: int, seed: int) -> np.ndarray:
    """The sorted indices of the `rows` training rows held out for validation."""
    if not 0 < rows < train_rows:
        raise DataError(f"--validation-rows {rows}: must lie between 1 and the training split's "
                        f"{train_rows - 1} rows (some must stay to train on)")
    return np.sort(np.random.default_rng(seed).permutation(train_rows)[:rows])


def split(data: Mnist, rows: int = ROWS, seed: int = SEED) -> tuple[Mnist, np.ndarray]:
    """(the derived data: train less the held-out rows, the held-out rows as "test"; their indices)."""
    index = held_out(len(data.y_train), rows, seed)
    keep = np.ones(len(data.y_train), bool)
    keep[index] = False
    return Mnist(data.x_train[keep], data.y_train[keep], data.x_train[index], data.y_train[index]), index


def prepare(source: str | None, cache_root: str, rows: int = ROWS, seed: int = SEED) -> Holdout:
    """Write (once) the derived data set for `source`, and say what it holds. Once it is written, a
    Parquet source is not read again (its manifest names its content); any other source is read
    only to hash it, as the job does (shards.prepare)."""
    parquet_dir, data, manifest = shards.prepare(source, cache_root, whole=False)
    index = held_out(manifest.rows("train"), rows, seed)
    target = join(cache_root, f"tune-{manifest.content_sha256[:16]}-val{rows}-seed{seed}")
    if not shards.is_parquet_dir(target):
        derived, _ = split(data if data is not None else shards.load_parquet(parquet_dir), rows, seed)
        try:
            shards.write_parquet(derived, target)
        except DataError:
            if not shards.is_parquet_dir(target):  # not a concurrent search that wrote it first
                raise
    written: Manifest = shards.read_manifest(target)
    return Holdout(rows, seed, manifest.content_sha256, hashlib.sha256(index.astype(np.int64).tobytes()).hexdigest(),
                   target, written.content_sha256, written.rows("train"))
