"""The run's console lines, written on Ray Train's controller (backend.Console) as each epoch's
checkpoint is registered, and at each restart.

An epoch shows once it is safe: Ray Train registers a checkpoint only once every worker has
reported it, and a restart continues from the latest registered one. So an epoch never shows twice,
even when a lost host takes several epochs with it: the workers ran ahead of the registration by
up to Ray Train's poll (0.5 s, cluster.ray_settings): on a real three-host cluster, epochs 2 and 3
of the sample, which rank 0 printing its own lines had shown, were lost with a host and shown again.

    epoch 3/30  2 workers  loss 0.3368  accuracy 0.9012  22,188 samples/s  0.1s  ~4s left
    restarted after a worker failure (heartbeat timeout on rank 1): continuing from epoch 4, restart 1 of 3
    epoch 4/30  1 worker  loss 0.2713  accuracy 0.9195  43,819 samples/s  0.1s  ~7s left  (resized from 2)

One line per event: a resize that follows a restart is told on the next epoch's line; one without a
failure (an elastic run grew, a rerun chose another size) gets a line of its own.
"""

from __future__ import annotations

import statistics

from trainer.train.elastic import reason


def progress_line(record: dict, epochs: int, seconds: list[float]) -> str:
    """An epoch's line; the time left from the median epoch in `seconds` (this launch's epochs)."""
    left = statistics.median(seconds or [record["seconds"]]) * (epochs - record["epoch"])
    workers = record.get("world_size", 1)
    return (f"epoch {record['epoch']}/{epochs}  {workers} worker{'s' if workers > 1 else ''}  "
            f"loss {record['loss']:.4f}  accuracy {record['accuracy']:.4f}  "
            + (f"val_accuracy {record['val_accuracy']:.4f}  " if "val_accuracy" in record else "") +
            f"{record['samples_per_second']:,.0f} samples/s  {record['seconds']:.1f}s  ~{left:.0f}s left")


def resize_line(after_epoch: int, old: int, new: int, reason: str) -> str:
    return (f"resized from {old} to {new} workers after epoch {after_epoch} ({reason}); "
            "continuing from its checkpoint")


def restart_line(cause: str, continuing_from: int, restart: int, max_failures: int) -> str:
    of = "unlimited" if max_failures == -1 else max_failures
    return f"restarted after a worker failure ({cause}): continuing from epoch {continuing_from}, restart {restart} of {of}"


class Lines:
    """What the console shows, from the events the controller sees, in order: `epoch(record)` for
    each registered epoch, `restart(...)` for each restart. Each returns the lines to print."""

    def __init__(self, epochs: int):
        self.epochs, self.seconds, self.launched, self.restarted = epochs, [], False, False

    def epoch(self, record: dict) -> list[str]:
        self.seconds.append(record["seconds"])
        line = progress_line(record, self.epochs, self.seconds)
        lines = []
        old, new = record.get("resized_from"), record.get("world_size", 1)
        if old is not None and old != new:
            if self.restarted:  # the restart line said why; this says to what
                line += f"  (resized from {old})"
            else:  # this launch's first epoch at another size: a rerun's
                lines.append(resize_line(record["epoch"] - 1, old, new, reason(old, new, self.launched)))
        self.launched, self.restarted = True, False
        return [*lines, line]

    def restart(self, cause: str, continuing_from: int, restart: int, max_failures: int) -> list[str]:
        self.restarted = True
        return [restart_line(cause, continuing_from, restart, max_failures)]
