"""mnist-serve's throughput and latency on loopback, against the same model's predict in a loop.

    python scripts/serve_benchmark.py --model models/mnist.keras      # about 3 minutes

For each app (1 replica, 2 replicas, 1 replica with batching off: --max-batch 1, and 1 replica with
the drift watch off: --drift-window 0) started as `python -m trainer.serve.app` on a free loopback port, and each count of concurrent clients (threads
posting one 28x28 test digit at a time, keep-alive off as curl does): requests per second, p50 and
p99 latency over --seconds, after a second of warm-up. The baseline, measured first in this process:
model.predict on one image in a plain Python loop. Prints the table with each rate as a ratio to it.
The model is served from a folder of its own (under --output) beside a shift reference, its outputs on
the sample's training images, so each app but the last watches its answers for drift as a store's
version is watched (trainer/serve/drift.py); one digit posted again and again is a drift it reports.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np

from trainer.common.cli import script_parser
from trainer.common.net import loopback_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "tests", "data", "mnist_sample.npz")
APPS = {"one": ("1 replica", ["--replicas", "1"]), "two": ("2 replicas", ["--replicas", "2"]),
        "unbatched": ("1 replica, batching off", ["--replicas", "1", "--max-batch", "1"]),
        "unwatched": ("1 replica, drift watch off", ["--replicas", "1", "--drift-window", "0"])}


def baseline(model_path: str, digit: np.ndarray, seconds: float) -> dict:
    """model.predict on one image at a time, in a loop: the plain Python way to serve it."""
    from trainer.track.models import load_model

    model, x = load_model(model_path), digit.reshape(1, 784).astype(np.float32) / 255.0
    model.predict(x, verbose=0)
    latencies, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        model.predict(x, verbose=0)
        latencies.append(time.monotonic() - started)
    return summary(latencies, seconds)


def summary(latencies: list[float], seconds: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"requests": len(ms), "per_second": len(ms) / seconds, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def load(url: str, body: bytes, clients: int, seconds: float) -> dict:
    """`clients` threads posting `body` for `seconds` (after 1 s of warm-up); failures counted."""
    latencies, failures, measuring, stop = [], [0], threading.Event(), threading.Event()

    def client():
        while not stop.is_set():
            started = time.monotonic()
            try:
                request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=30) as response:
                    response.read()
            except Exception:
                failures[0] += 1
                continue
            if measuring.is_set():
                latencies.append(time.monotonic() - started)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    measuring.set()
    time.sleep(seconds)
    measuring.clear()
    stop.set()
    for t in threads:
        t.join()
    return {**summary(latencies, seconds), "failures": failures[0]}


def watched(model_path: str, folder: str) -> str:
    """The model copied into `folder` beside its shift reference (its outputs on the sample's training
    images), as a store keeps a version."""
    import shutil

    from trainer.data.shift import REFERENCE
    from trainer.track.models import load_model

    os.makedirs(folder, exist_ok=True)
    served = os.path.join(folder, os.path.basename(model_path))
    shutil.copyfile(model_path, served)
    with np.load(SAMPLE) as npz:
        images = npz["x_train"].reshape(-1, 784).astype(np.float32) / 255.0
    np.save(os.path.join(folder, REFERENCE), np.asarray(load_model(model_path).predict(images, verbose=0), np.float32))
    return served


def serve(model_path: str, flags: list[str], log: str):
    port = loopback_port()
    proc = subprocess.Popen([sys.executable, "-m", "trainer.serve.app", "--model", model_path, "--port", str(port), *flags],
                            cwd=ROOT, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"error: mnist-serve exited; see {log}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5):
                return proc, url
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"error: mnist-serve did not answer in 180 s; see {log}")
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--model", required=True, help="a trained model (.keras or .h5)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument("--output", default="serve-bench", help="serve_benchmark.json and the apps' logs")
    parser.add_argument("--apps", default=",".join(APPS), help=f"which apps, in order ({', '.join(APPS)})")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.model):
        parser.error(f"no such model file: {args.model}")
    unknown = sorted(set(args.apps.split(",")) - set(APPS))
    if unknown:
        parser.error(f"unknown app(s) {', '.join(unknown)}; choose from {', '.join(APPS)}")
    os.makedirs(args.output, exist_ok=True)
    with np.load(SAMPLE) as npz:
        digit = npz["x_test"][0]
    body = json.dumps({"image": digit.tolist()}).encode()
    rows = [{"app": "model.predict, one image at a time (baseline)", "clients": 1,
             **baseline(args.model, digit, args.seconds)}]
    model = watched(args.model, os.path.join(args.output, "model"))
    for name, flags in (APPS[key] for key in args.apps.split(",")):
        proc, url = serve(os.path.abspath(model), flags, os.path.join(args.output, f"{name}.log"))
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                rows.append({"app": name, "clients": clients, **load(url + "/predict", body, clients, args.seconds)})
                print(f"{name}, {clients} clients: {rows[-1]['per_second']:.0f} requests/s", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    base = rows[0]["per_second"]
    print(f"{'app':<48}{'clients':>8}{'req/s':>9}{'x base':>8}{'p50 ms':>9}{'p99 ms':>9}{'failed':>8}")
    for row in rows:
        print(f"{row['app']:<48}{row['clients']:>8}{row['per_second']:>9.0f}{row['per_second'] / base:>8.2f}"
              f"{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}{row.get('failures', 0):>8}")
    with open(os.path.join(args.output, "serve_benchmark.json"), "w") as f:
        json.dump({"command": " ".join([sys.executable, *sys.argv]), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
