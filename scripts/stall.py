"""Stall and soak: the real job, with one training worker frozen (SIGSTOP, then SIGCONT) mid-run,
or with a CPU hog holding every core; one row per run: what happened, when, and with which message.

    python scripts/stall.py --data ../shared/data/mnist --stall 5 10 20 40     # one run per stall
    python scripts/stall.py --data ../shared/data/mnist --hog --runs 5         # the soak: 5 runs under a hog
    python scripts/stall.py --data ../shared/data/mnist --stall 20 -- --max-failures 0   # job flags after --

Every other flag is the job's default (2 workers, 5 epochs, batch 128). A stall starts 1 s after
`epoch N/` is printed (--after-epoch, default 2: mid-epoch 3) on rank --rank (1); the worker's pid
is the one its actor wrote into the latest checkpoint (never found by process name).
"""

from __future__ import annotations

import glob
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from trainer.common.cli import script_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "train_mnist.py")


def hog(stop: multiprocessing.Event) -> None:
    while not stop.is_set():
        sum(range(10_000))


def latest_worker_pid(storage: str, rank: int) -> int | None:
    """The pid rank `rank` wrote into the newest checkpoint of the only run under `storage`."""
    files = sorted(glob.glob(os.path.join(storage, "*", "checkpoint_*", "workers", f"rank-{rank}.json")),
                   key=os.path.getmtime)
    for path in reversed(files):
        try:
            with open(path) as f:
                return json.load(f)["pid"]
        except (OSError, ValueError, KeyError):
            continue
    return None


def one_run(args, stall_s: float, work: str, label: str) -> dict:
    out, storage = os.path.join(work, label, "out"), os.path.join(work, label, "runs")
    command = [sys.executable, JOB, "--data", args.data, "--output", out, "--storage-path", storage, *args.job]
    started = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, stalled = [], None
    trigger = f"epoch {args.after_epoch}/"

    def freeze():
        nonlocal stalled
        time.sleep(1.0)
        pid = latest_worker_pid(storage, args.rank)
        if pid is None:
            return
        os.kill(pid, signal.SIGSTOP)
        stalled = {"pid": pid, "at": time.monotonic() - started}
        time.sleep(stall_s)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            stalled["gone"] = True

    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if stall_s and stalled is None and line.startswith(trigger):
            stalled = {}
            threading.Thread(target=freeze, daemon=True).start()
    code = proc.wait()
    seconds = time.monotonic() - started
    metrics = {}
    try:
        with open(os.path.join(out, "metrics.json")) as f:
            metrics = json.load(f)
    except (OSError, ValueError):
        pass
    with open(os.path.join(work, label, "console.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    restarts = [line for line in lines if line.startswith("restarted after")]
    errors = [line for line in lines if line.startswith("error:")]
    return {"label": label, "stall_s": stall_s, "exit": code, "seconds": round(seconds, 1),
            "console_lines": len(lines), "restarts": len(restarts), "restart_lines": restarts,
            "error": errors[-1] if errors else None, "test_accuracy": metrics.get("test_accuracy"),
            "epochs": [e["epoch"] for e in metrics.get("epochs", [])], "stalled": stalled,
            "console": os.path.join(work, label, "console.txt")}


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", required=True, help="MNIST for the job (--data)")
    parser.add_argument("--stall", type=float, nargs="*", default=[], help="seconds to freeze a worker, one run each")
    parser.add_argument("--runs", type=int, default=0, help="undisturbed runs (with --hog: the soak)")
    parser.add_argument("--hog", action="store_true", help="a busy process per core for the whole invocation")
    parser.add_argument("--after-epoch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--work", default=None, help="folder for the runs (default: a temporary one)")
    parser.add_argument("job", nargs="*", help="job flags, after --")
    args = parser.parse_args()
    if not args.stall and not args.runs:
        parser.error("give --stall SECONDS... or --runs N")
    work = args.work or tempfile.mkdtemp(prefix="stall-")
    stop = multiprocessing.Event()
    hogs = [multiprocessing.Process(target=hog, args=(stop,), daemon=True) for _ in range(os.cpu_count() if args.hog else 0)]
    for p in hogs:
        p.start()
    rows = []
    try:
        plan = [(s, f"stall-{s:g}s") for s in args.stall] + [(0, f"run-{i + 1}") for i in range(args.runs)]
        for stall_s, label in plan:
            row = one_run(args, stall_s, work, label)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        stop.set()
        for p in hogs:
            p.join(timeout=5)
    print(f"\n{'run':<12} {'exit':>4} {'seconds':>8} {'restarts':>8} {'accuracy':>8}  error / restart lines"
          + (" (under a CPU hog on every core)" if args.hog else ""))
    for r in rows:
        acc = f"{r['test_accuracy']:.4f}" if r["test_accuracy"] is not None else "-"
        note = r["error"] or "; ".join(r["restart_lines"]) or ""
        print(f"{r['label']:<12} {r['exit']:>4} {r['seconds']:>8.1f} {r['restarts']:>8} {acc:>8}  {note[:200]}")
    print(f"(consoles in {work})")
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
