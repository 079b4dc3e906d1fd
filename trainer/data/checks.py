"""Checks on arriving data before a retraining cycle trains on it.

Each promoted version keeps a small profile of its training data (in version.json). A cycle
profiles the new data and compares: it refuses to train when the training rows shrink, the label
mix moves, a digit all but disappears, test images turn up in the training split, or the pixels'
statistics move (inverted images, 0..1 floats cast to 0..255, labels swapped between digits).

    new = profile(mnist)    # or Profiler(x_test), add() each piece of the training split, profile()
    problems = compare(current_record["data"]["profile"], new, Limits())   # [] means train

Pure numpy; nothing here knows about Ray, TensorFlow or Keras.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from trainer.data.mnist import Mnist

DIGITS = 10
SKETCH = 256  # the smallest image hashes kept: a bottom-k sketch, about 4 KB, estimates overlap to ~5%


@dataclass(frozen=True)
class Limits:
    max_row_drop: float = 0.10  # the training rows may shrink by this fraction
    # Total variation distance between the label mixes (half the L1 distance of the shares): the
    # fraction of rows whose label would have to change. Unlike a chi-squared test it does not
    # grow with the row count, so 60,000 or 8 million rows get the same tolerance for a real shift.
    max_label_distance: float = 0.05
    min_digit_ratio: float = 0.5  # a digit's share may fall to this fraction of its share before
    max_ink_change: float = 0.25  # mean pixel intensity, overall and per digit: relative change
    max_blank_change: float = 0.10  # the fraction of zero pixels: absolute change


def image_hashes(images: np.ndarray) -> np.ndarray:
    """A 64-bit hash (blake2b) of each image's bytes: equal images, equal hashes."""
    flat = np.ascontiguousarray(images).reshape(len(images), int(np.prod(np.shape(images)[1:])))
    return np.array([int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little")
                     for row in flat], dtype=np.uint64)


def profile(data: Mnist) -> dict:
    """The training split's row count, label histogram, pixel statistics and hash sketch, and
    how many test images are also training images (exactly, by hash)."""
    profiler = Profiler(data.x_test)
    profiler.add(data.x_train, data.y_train)
    return profiler.profile()


class Profiler:
    """profile() taken piece by piece, for a training split that is never whole in memory (8.1M rows
    are 6.3 GB): add() its rows in any pieces, then profile(). What it keeps is a few sums, the test
    split's 10,000 hashes and the sketch."""

    def __init__(self, x_test: np.ndarray):
        self.test_hashes = np.sort(image_hashes(x_test))  # sorted: each piece's rows are looked up in it
        self.leaked = np.zeros(len(self.test_hashes), bool)
        self.labels = np.zeros(DIGITS, np.int64)
        self.ink = np.zeros(DIGITS)  # per digit: the sum of its images' mean intensities
        self.blank = self.pixels = 0
        self.sketch = np.empty(0, np.uint64)

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        hashes = image_hashes(x)
        if len(self.test_hashes):  # np.isin would sort the piece; a lookup in the sorted test hashes does not
            at = np.minimum(np.searchsorted(self.test_hashes, hashes), len(self.test_hashes) - 1)
            found = self.test_hashes[at] == hashes
            self.leaked |= np.isin(self.test_hashes, hashes[found])
        smallest = hashes if len(hashes) <= SKETCH else hashes[np.argpartition(hashes, SKETCH)[:SKETCH]]
        self.sketch = np.unique(np.concatenate([self.sketch, smallest]))[:SKETCH]
        ink = x.reshape(len(x), -1).sum(axis=1, dtype=np.uint32) / (255.0 * x[0].size) if len(x) else np.empty(0)
        self.labels += np.bincount(y, minlength=DIGITS)[:DIGITS]
        self.ink += np.bincount(y, weights=ink, minlength=DIGITS)[:DIGITS]
        self.blank += x.size - int(np.count_nonzero(x))
        self.pixels += x.size

    def profile(self) -> dict:
        rows = int(self.labels.sum())
        return {
            "train_rows": rows,
            "labels": self.labels.tolist(),
            "pixels": {"mean": float(self.ink.sum() / rows) if rows else 0.0,
                       "blank": self.blank / self.pixels if self.pixels else 0.0,
                       "digit_mean": [float(self.ink[d] / self.labels[d]) if self.labels[d] else 0.0
                                      for d in range(DIGITS)]},
            "leaked_test_images": int(self.leaked.sum()),
            "sketch": [f"{h:016x}" for h in self.sketch],
        }


def overlap(old: dict, new: dict) -> float | None:
    """Estimated share of images common to the two training sets (Jaccard, from the bottom-k sketches)."""
    a, b = set(old.get("sketch", [])), set(new.get("sketch", []))
    union = sorted(a | b)[:SKETCH]
    return sum(1 for h in union if h in a and h in b) / len(union) if union else None


def compare(old: dict, new: dict, limits: Limits) -> list[str]:
    """What is wrong with the new data against the current version's profile: one phrase per check
    that fails, with its numbers; [] when it may be trained on."""
    problems = []
    if new["leaked_test_images"]:
        problems.append(f"leakage: {new['leaked_test_images']} test images are also in the training split")
    rows_old, rows_new = old["train_rows"], new["train_rows"]
    if rows_new < (1 - limits.max_row_drop) * rows_old:
        problems.append(f"rows: {rows_old} -> {rows_new} training rows ({rows_new / rows_old - 1:+.1%}; "
                        f"the limit is -{limits.max_row_drop:.0%})")
    share_old, share_new = _shares(old["labels"]), _shares(new["labels"])
    distance = 0.5 * float(np.abs(share_old - share_new).sum())
    if distance > limits.max_label_distance:
        moved = int(np.argmax(np.abs(share_old - share_new)))
        problems.append(f"labels: the label mix moved by {distance:.3f} (total variation; limit "
                        f"{limits.max_label_distance}), most for digit {moved}: {share_old[moved]:.1%} -> "
                        f"{share_new[moved]:.1%} of rows")
    scarce = [d for d in range(DIGITS) if share_new[d] < limits.min_digit_ratio * share_old[d]]
    if scarce:
        problems.append("digits: " + ", ".join(f"digit {d} {share_old[d]:.1%} -> {share_new[d]:.1%} of rows"
                                               for d in scarce)
                        + f" (the floor is {limits.min_digit_ratio:.0%} of its share before)")
    problems += _pixels(old["pixels"], new["pixels"], limits)
    return problems


def _pixels(old: dict, new: dict, limits: Limits) -> list[str]:
    moved = []
    if abs(new["mean"] / old["mean"] - 1) > limits.max_ink_change:
        moved.append(f"mean intensity {old['mean']:.4f} -> {new['mean']:.4f}")
    if abs(new["blank"] - old["blank"]) > limits.max_blank_change:
        moved.append(f"zero pixels {old['blank']:.1%} -> {new['blank']:.1%}")
    if not moved:  # labels swapped between digits move each digit's ink, not the whole set's
        moved += [f"digit {d} mean intensity {a:.4f} -> {b:.4f}" for d, (a, b)
                  in enumerate(zip(old["digit_mean"], new["digit_mean"])) if a and b and abs(b / a - 1) > limits.max_ink_change]
    return [f"pixels: {', '.join(moved)} (limits: {limits.max_ink_change:.0%} relative change of intensity, "
            f"{limits.max_blank_change:.0%} of zero pixels)"] if moved else []


def _shares(counts: list[int]) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return counts / max(counts.sum(), 1.0)
