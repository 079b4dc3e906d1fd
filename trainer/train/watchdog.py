"""A bound on a worker's wait in a collective: a peer that is gone, or frozen past --stall-timeout-s,
leaves TensorFlow's collectives waiting for ever; this aborts them, so the step fails and Ray Train
restarts the group."""

from __future__ import annotations

import contextlib
import threading
import time


class Watchdog:
    """Aborts this worker's collectives when nothing has progressed for `timeout_s` (a peer that is
    gone, or frozen past --stall-timeout-s, leaves them waiting for ever), so the step fails and Ray
    Train restarts the group. One thread, whatever the number of steps; `abort` is the call
    TensorFlow's own peer health check makes (trainer/train/tf_internals.py)."""

    def __init__(self, timeout_s: float, abort):
        self.timeout_s, self.abort, self._stopped = timeout_s, abort, threading.Event()
        self.last: float | None = time.monotonic()  # None: paused
        self.fired: float | None = None  # the timeout, once it aborted the collectives: why the step failed
        threading.Thread(target=self._watch, name="collective-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def beat(self) -> None:
        """Progress: a training call or a collective finished."""
        self.last = time.monotonic()

    @contextlib.contextmanager
    def paused(self):
        """No collective runs in the block (a checkpoint upload): no clock; it restarts after."""
        self.last = None
        try:
            yield
        finally:
            self.beat()

    def _watch(self) -> None:
        while not self._stopped.wait(min(self.timeout_s / 10, 5.0)):
            last = self.last
            if last is not None and time.monotonic() - last > self.timeout_s:
                self.fired = self.timeout_s
                self.abort(f"no progress for {self.timeout_s:g}s: a peer is gone or stalled (--stall-timeout-s)")
                return
