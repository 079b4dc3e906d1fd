"""MNIST as arrays: the container, its validation, and its identity (a content hash).

Pure numpy: nothing here reads files or knows about Ray or TensorFlow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from trainer.common import errors

SPLITS = ("train", "test")
IMAGE_SHAPE = (28, 28)
IMAGE_BYTES = 28 * 28


class DataError(errors.InputError):
    """A data source is missing, malformed or inconsistent. The message is one line."""


@dataclass(frozen=True)
class Mnist:
    x_train: np.ndarray  # (n, 28, 28) uint8
    y_train: np.ndarray  # (n,) uint8 in 0..9
    x_test: np.ndarray
    y_test: np.ndarray

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        return getattr(self, f"x_{name}"), getattr(self, f"y_{name}")


def validate(data: Mnist, where: str) -> Mnist:
    """Check shapes, dtypes, counts and label range; return uint8 arrays or raise DataError."""
    out = {}
    for split in SPLITS:
        x, y = data.split(split)
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 3 or x.shape[1:] != IMAGE_SHAPE:
            raise DataError(f"{where}: {split} images have shape {x.shape}, expected (n, 28, 28)")
        if x.dtype != np.uint8:
            raise DataError(f"{where}: {split} images are {x.dtype}, expected uint8")
        if len(x) == 0:
            raise DataError(f"{where}: the {split} split is empty")
        problem = label_problem(y, f"{split} labels")
        if problem:
            raise DataError(f"{where}: {problem}")
        if len(y) != len(x):
            raise DataError(f"{where}: {len(x)} {split} images but {len(y)} labels")
        out[f"x_{split}"], out[f"y_{split}"] = x, y.astype(np.uint8)
    return Mnist(**out)


def label_problem(labels: np.ndarray, what: str = "labels") -> str | None:
    """Why `labels` are not digit labels (a 1-D integer array in 0..9), or None if they are."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        return f"{what} must be a 1-D integer array, got {labels.dtype} {labels.shape}"
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        return f"{what} must lie in 0..9, found {labels.min()}..{labels.max()}"
    return None


class ContentHash:
    """content_hash taken piece by piece, for data that is never whole in memory: for each split in
    SPLITS order, start(split, rows), its images in row order (any pieces), then all its labels."""

    def __init__(self):
        self._sha = hashlib.sha256()

    def start(self, split: str, rows: int) -> None:
        self._sha.update(f"{split}:{rows}:".encode())

    def add(self, array: np.ndarray) -> None:
        self._sha.update(np.ascontiguousarray(array).tobytes())

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def content_hash(data: Mnist) -> str:
    """sha256 over both splits' labels and pixels: the data's identity across formats."""
    digest = ContentHash()
    for split in SPLITS:
        x, y = data.split(split)
        digest.start(split, len(x))
        digest.add(x)
        digest.add(y)
    return digest.hexdigest()
