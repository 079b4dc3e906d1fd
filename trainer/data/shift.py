"""Black-box shift detection (BBSD): has the data moved, as the model sees it?

Rabanser, Günnemann and Lipton, *Failing Loudly: An Empirical Study of Methods for Detecting Dataset
Shift* (NeurIPS 2019), found it the best detector overall on MNIST and CIFAR-10: the trained model's
softmax outputs on a sample of the arriving data against its outputs on a reference sample, one
two-sample Kolmogorov-Smirnov test per class, and a Bonferroni correction over the classes (the
family's p-value is the smallest class's times the number of classes, at most 1).

    found = bbsd(reference_outputs, arriving_outputs)    # (n, 10) softmax rows each
    if found.p_value < alpha: refuse(found.describe(alpha))

In a retraining cycle (trainer/promote/promotion.py) the reference is kept with each version: its
model's outputs on a fixed sample of its own training split. The next cycle runs the *current*
model on the same-sized sample of the arriving training split and tests the two. Its power and
false alarms on MNIST are measured by scripts/shift_power.py (docs/operations.md, "Shift
detection, measured").

Pure numpy and scipy; the outputs come from whoever holds the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DETECTOR = "BBSD (Kolmogorov-Smirnov on the model's softmax per class, Bonferroni)"
ALPHA = 0.01  # the level over the whole family of classes (mnist-retrain --drift-alpha)
SAMPLE_ROWS = 10_000  # rows on each side: the reference, and the arriving sample
SEED = 0  # which rows: fixed, so a cycle on the same data tests the same sample
REFERENCE = "shift_reference.npy"  # a version's outputs on SAMPLE_ROWS of its training split (400 KB)


@dataclass(frozen=True)
class Shift:
    """One BBSD test: each class's KS statistic and p-value, and the family's corrected p-value."""

    statistics: tuple[float, ...]
    p_values: tuple[float, ...]
    reference_rows: int
    arriving_rows: int

    @property
    def p_value(self) -> float:
        return min(1.0, len(self.p_values) * min(self.p_values))

    @property
    def statistic(self) -> float:
        return max(self.statistics)

    def moved(self, count: int = 3) -> list[int]:
        """The classes whose outputs moved most (largest KS statistic first)."""
        return [int(c) for c in np.argsort(self.statistics)[::-1][:count]]

    def describe(self, alpha: float) -> str:
        classes = ", ".join(f"{c} (D {self.statistics[c]:.3f})" for c in self.moved())
        return (f"shift: {DETECTOR}: largest D {self.statistic:.3f}, p {self.p_value:.2g} "
                f"{'<' if self.p_value < alpha else '>='} alpha {alpha:g} over {len(self.p_values)} classes, "
                f"{self.arriving_rows} arriving rows against {self.reference_rows}; moved most: digits {classes}")

    def to_dict(self) -> dict:
        return {"detector": DETECTOR, "statistic": self.statistic, "p_value": self.p_value,
                "statistics": list(self.statistics), "p_values": list(self.p_values),
                "reference_rows": self.reference_rows, "arriving_rows": self.arriving_rows}


def bbsd(reference: np.ndarray, arriving: np.ndarray) -> Shift:
    """KS per column of two (n, classes) output arrays."""
    from scipy.stats import ks_2samp

    reference, arriving = np.asarray(reference), np.asarray(arriving)
    if reference.ndim != 2 or arriving.ndim != 2 or reference.shape[1] != arriving.shape[1]:
        raise ValueError(f"BBSD needs two (rows, classes) arrays with the same classes, got {reference.shape} "
                         f"and {arriving.shape}")
    if not len(reference) or not len(arriving):
        raise ValueError("BBSD needs at least one row on each side")
    tests = [ks_2samp(reference[:, c], arriving[:, c]) for c in range(reference.shape[1])]
    return Shift(tuple(float(t.statistic) for t in tests), tuple(float(t.pvalue) for t in tests),
                 len(reference), len(arriving))


def sample_rows(rows: int, size: int, seed: int) -> np.ndarray:
    """A fixed sample of row indices (sorted, without replacement; all rows if there are fewer)."""
    if rows <= size:
        return np.arange(rows)
    return np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
