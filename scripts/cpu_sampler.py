"""CPU seconds of every process under a job, sampled with psutil while it runs.

The benchmark uses it to say what the processes around the training workers cost per epoch: the
driver, Ray Train's controller, Ray Data's actors, the raylet, idle Ray workers. Ray names its worker
processes `ray::<ActorClass>.<method>` (setproctitle), which is what groups them here.
"""

from __future__ import annotations

import os
import threading
import time

import psutil


def _processes() -> dict[int, tuple[int, float, str]]:
    """{pid: (parent pid, CPU seconds so far, name)} of every process we can read."""
    found = {}
    for process in psutil.process_iter(["ppid", "cpu_times", "cmdline", "name"]):
        info = process.info
        if info["cpu_times"] is None:  # gone meanwhile, or not ours to read
            continue
        argv = info["cmdline"] or [info["name"] or "?"]
        title = argv[0]
        name = title.split(".")[0].split()[0] if title.startswith("ray::") else os.path.basename(title.split()[0] if title else "?")
        if name.startswith("python") and len(argv) > 1:  # a Python process: name it by its script
            script = next((a for a in argv[1:] if a and not a.startswith("-")), "")
            name = os.path.basename(script) or name
        found[process.pid] = (info["ppid"], info["cpu_times"].user + info["cpu_times"].system, name)
    return found


class CpuSampler:
    """Samples the process tree under `root` every `interval` seconds until stop()."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root, self.interval = root, interval
        self.samples: list[tuple[float, dict[int, tuple[str, float]]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "CpuSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = _processes()
            children: dict[int, list[int]] = {}
            for pid, (parent, _, _) in table.items():
                children.setdefault(parent, []).append(pid)
            tree, todo = {}, [self.root]
            while todo:
                pid = todo.pop()
                if pid in table:
                    tree[pid] = ("driver" if pid == self.root else table[pid][2], table[pid][1])
                todo.extend(children.get(pid, []))
            self.samples.append((time.time(), tree))
            self._stop.wait(self.interval)

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each process name used between two Unix times (nearest samples)."""
        if not self.samples:
            return {}
        first = min(self.samples, key=lambda s: abs(s[0] - start))[1]
        last = min(self.samples, key=lambda s: abs(s[0] - end))[1]
        used: dict[str, float] = {}
        for pid, (name, seconds) in last.items():
            used[name] = used.get(name, 0.0) + seconds - first.get(pid, (name, 0.0))[1]
        return dict(sorted(used.items(), key=lambda item: -item[1]))
