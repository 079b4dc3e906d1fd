"""Where a run's time goes: named points in Unix time, kept as seconds since the driver started.

The driver marks its own points; each worker marks its own in its checkpoint file, and the driver
keeps the slowest worker's (the one everybody waits for). metrics.json["timeline"] holds the result
and `scripts/benchmark.py` prints it, so a start-up regression shows up as one point moving.
"""

from __future__ import annotations

import resource
import time

import psutil

DRIVER_POINTS = ("process_start", "ray_up", "driver_imports_done", "training_launched")
WORKER_POINTS = ("worker_started", "loop_started", "tensorflow_imported", "shard_in_memory",
                 "collectives_ready", "first_step", "last_step")
END_POINTS = ("training_done", "ray_down", "evaluation_done", "outputs_written")
POINTS = DRIVER_POINTS + WORKER_POINTS + END_POINTS


def process_start_time(pid: int | None = None) -> float:
    """Unix time at which a process (this one by default) started, to 10 ms; now where unknown."""
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return time.time()
    if hasattr(time, "CLOCK_BOOTTIME"):  # Linux: psutil adds the start to a boot time in whole seconds
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - (started - psutil.boot_time()))
    return started


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB. On Linux, VmHWM: ru_maxrss there carries the
    peak of the process that forked this one across the exec (a job started by a 2.6 GB test runner
    measured 2,654 MB instead of 898), VmHWM starts afresh with the new program."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux, the same unit


def merge(driver: dict[str, float], workers: list[dict]) -> dict[str, float]:
    """Driver points plus, per worker point, the latest worker's (the earliest for worker_started),
    as seconds since process_start, in POINTS order."""
    points = dict(driver)
    for name in WORKER_POINTS:
        values = [w[name] for w in workers if name in w]
        if values:
            points[name] = min(values) if name == "worker_started" else max(values)
    origin = points["process_start"]
    return {name: round(points[name] - origin, 3) for name in POINTS if name in points}


def format_timeline(timeline: dict[str, float]) -> str:
    """`process_start 0.0s | ray_up 3.1s (+3.1) | ...` on one line."""
    parts, previous = [], 0.0
    for name, at in timeline.items():
        parts.append(f"{name} {at:.1f}s" + (f" (+{at - previous:.1f})" if parts else ""))
        previous = at
    return " | ".join(parts)
