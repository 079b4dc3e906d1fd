"""The served model watches its inputs: a bounded window of the answers a replica gave (their softmax
rows) tested against the served version's shift reference with the retraining cycle's detector
(trainer/data/shift.py: BBSD, a KS test per class, Bonferroni).

    watch = Watch(reference, size=1000, alpha=0.01)   # reference: the version's shift_reference.npy
    watch.add(probs)                                   # each model call: a copy into a ring buffer
    report = watch.check()                             # the test on the window now (a few ms)

A version's reference lies beside its model (versions/<id>/shift_reference.npy); a model without
one is served unwatched, and GET /drift says why. `add` is all a request pays: a lock and a row copy.
The test runs off the request path, in the replica's watch thread and on GET /drift. The first test
that finds a shift logs one line; the window then stays "drifting" until a test finds none.
"""

# No `from __future__ import annotations`: Report is a pydantic model FastAPI documents (see app.py).
import os
import threading
import time

import numpy as np
from pydantic import BaseModel, Field

from trainer.data import shift

WINDOW = 1000  # answers a replica keeps: BBSD at 1,000 rows catches the large shifts (docs/operations.md)
MIN_ANSWERS = 100  # fewer in the window: not tested yet


class Report(BaseModel):
    """What a replica's test of its window found (GET /drift, with the version; each replica keeps
    its own window)."""

    watching: bool = Field(description="false where the served model has no shift reference, or --drift-window 0")
    detector: str
    alpha: float = Field(description="the test's level over the ten digits")
    window: int = Field(description="answers in this replica's window now")
    window_size: int
    window_since: float | None = Field(description="when the window's oldest answer was given, seconds since the epoch")
    drift: bool | None = Field(description=f"null until the window holds {MIN_ANSWERS} answers")
    statistic: float | None = Field(description="the largest digit's Kolmogorov-Smirnov statistic")
    p_value: float | None = Field(description="Bonferroni-corrected over the ten digits")
    moved: list[int] = Field(description="the digits whose probabilities moved most")
    drifting_since: float | None = Field(description="when this replica first found the drift still found now")
    note: str = Field(description="the finding in one line, or why there is none")


def reference_beside(model_path: str) -> np.ndarray | None:
    """The shift reference kept beside a model (a store version's folder), or None."""
    path = os.path.join(os.path.dirname(model_path), shift.REFERENCE)
    return np.load(path, allow_pickle=False) if os.path.isfile(path) else None


class Watch:
    """A replica's window of answers for one served version, and the detector's state on it."""

    def __init__(self, reference: np.ndarray | None, size: int = WINDOW, alpha: float = shift.ALPHA):
        self.reference, self.size, self.alpha = reference, size, alpha
        self.watching = reference is not None and size > 0
        self._rows = np.empty((size if self.watching else 0, 10), np.float32)
        self._times = np.zeros(len(self._rows))
        self._next = self._count = self._added = 0  # _added: answers ever added, to tell a new window
        self._tested: tuple[int, Report] | None = None  # the last test, and how many answers it had seen
        self._lock = threading.Lock()
        self.drifting_since: float | None = None

    def add(self, probs: np.ndarray) -> None:
        """Keep the newest `size` answers (the request path's whole cost)."""
        if not self.watching:
            return
        probs = probs[-self.size:]
        now = time.time()
        with self._lock:
            ends = np.arange(self._next, self._next + len(probs)) % self.size
            self._rows[ends], self._times[ends] = probs, now
            self._next = (self._next + len(probs)) % self.size
            self._count = min(self.size, self._count + len(probs))
            self._added += len(probs)

    def check(self) -> tuple[Report, bool]:
        """The test on the window now, and whether it is the first to find a shift (say so once). A
        window no answer has joined since the last test keeps that test's report: an idle replica
        does not test the same rows every poll."""
        with self._lock:
            if self._tested and self._tested[0] == self._added:
                return self._tested[1], False
            rows, times, added = self._rows[:self._count].copy(), self._times[:self._count].copy(), self._added
        since = float(times.min()) if len(times) else None
        base = {"watching": self.watching, "detector": shift.DETECTOR, "alpha": self.alpha, "window": len(rows),
                "window_size": self.size, "window_since": since}
        if not self.watching:
            why = "no shift reference beside the served model" if self.reference is None else "--drift-window 0"
            return Report(**base, drift=None, statistic=None, p_value=None, moved=[], drifting_since=None,
                          note=f"not watching: {why}"), False
        if len(rows) < min(MIN_ANSWERS, self.size):
            return Report(**base, drift=None, statistic=None, p_value=None, moved=[], drifting_since=None,
                          note=f"{len(rows)} answers so far; testing from {min(MIN_ANSWERS, self.size)}"), False
        found = shift.bbsd(self.reference, rows)
        drift = found.p_value < self.alpha
        with self._lock:  # the watch thread and GET /drift both test: one of them is first
            first = drift and self.drifting_since is None
            self.drifting_since = (self.drifting_since or time.time()) if drift else None
            report = Report(**base, drift=drift, statistic=found.statistic, p_value=found.p_value,
                            moved=found.moved(), drifting_since=self.drifting_since, note=found.describe(self.alpha))
            self._tested = (added, report)
        return report, first
