"""Memory and speed as the training data grows: the growth table of docs/performance.md.

    python scripts/make_big_mnist.py --rows 1000000 --output big/1m        # about 1 minute
    python scripts/data_growth.py ../shared/data/mnist big/1m big/8m       # one job per data set

Each data set is one job (jobs/train_mnist.py, 2 workers, batch 128, 1 epoch; the first, the
reference, 3 epochs and its steady epochs' rate), run in turn on a local Ray this script starts
on loopback, so that it can read the object store's use every 0.5 s. For each: the data path the
job took, the driver's and each worker's peak RSS (metrics.json), the object store's peak, samples/s
as a ratio to the reference's, start to first step (from the job's process start; a Ray already
running, so without Ray's own start) as a ratio to the reference's, wall time and test accuracy.
--job-args adds flags to every job (e.g. '--data-path memory' for today's path at every size).
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time

from trainer.common.atomic import write_json_atomic
from trainer.common.cli import script_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "jobs", "train_mnist.py")
COLUMNS = (  # (key, title, format)
    ("train_rows", "rows", "{:,}"), ("path", "path", "{}"),
    ("driver_peak_rss_mb", "driver MB", "{:,.0f}"), ("worker_peak_rss_mb", "worker MB", "{:,.0f}"),
    ("object_store_peak_mb", "store MB", "{:,.0f}"), ("samples_per_second", "samples/s", "{:,.0f}"),
    ("samples_ratio", "x ref", "{:.2f}"), ("start_to_first_step_s", "start->step s", "{:.1f}"),
    ("start_ratio", "x ref", "{:.2f}"), ("wall_s", "wall s", "{:.0f}"), ("test_accuracy", "test acc", "{:.4f}"),
)


class StoreSampler:
    """The object store's bytes in use, read every `interval` s on a thread; `peak_mb` since reset.
    The figure `ray memory --stats-only` prints, read through the same private call (the one seam)."""

    def __init__(self, gcs_address: str, interval: float = 0.5):
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        state = get_state_from_address(gcs_address)
        self._read = lambda: get_memory_info_reply(state).store_stats.object_store_bytes_used
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), daemon=True)
        self._thread.start()

    def _watch(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, self._read())
            except Exception:  # a missed reading is no reason to stop the benchmark
                pass

    def reset(self) -> None:
        self.peak = 0

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_job(data: str, epochs: int, address: str, output: str, extra: list[str], timeout: float) -> dict:
    """One job on `data`; its figures from metrics.json."""
    runs = sum(name.startswith("run-") and name.endswith(".log") for name in os.listdir(output))
    out = os.path.join(output, f"run-{runs}")
    storage = os.path.abspath(os.path.join(output, "ray_results"))
    prepare_once(data, storage)
    command = [sys.executable, JOB, "--data", os.path.abspath(data), "--epochs", str(epochs), "--num-workers", "2",
               "--address", address, "--output", out, "--storage-path", storage, *extra]
    started = time.time()
    with open(out + ".log", "w") as log:
        done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT)
    if done.returncode:
        raise SystemExit(f"error: the job on {data} failed (exit {done.returncode}); see {out}.log")
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    history = metrics["epochs"]
    steady = history[1:] or history
    return {"data": data, "train_rows": metrics["data"]["train_rows"], "epochs": epochs,
            "path": "stream" if metrics["data"].get("streamed") else "memory",
            "driver_peak_rss_mb": metrics["driver_peak_rss_mb"],
            "worker_peak_rss_mb": max(w["peak_rss_mb"] for w in metrics["workers"]),
            "samples_per_second": statistics.median(h["samples_per_second"] for h in steady),
            "start_to_first_step_s": metrics["timeline"]["first_step"],
            "wall_s": time.time() - started, "test_accuracy": metrics["test_accuracy"],
            "shards_cover": sum(w["rows"] for w in metrics["workers"]) == metrics["workers"][0]["global_rows_seen"]
            and metrics["workers"][0]["global_rows_duplicated"] == 0}


def prepare_once(data: str, storage: str) -> None:
    """Write a non-Parquet source's shards where the job looks, untimed (a user's second run reuses them)."""
    from trainer.data import shards as mnist_data
    from trainer.train.plan import DATA_DIR

    if not mnist_data.is_parquet_dir(data):
        mnist_data.prepare(data, os.path.join(storage, DATA_DIR))


def format_table(rows: list[dict]) -> str:
    lines = ["  ".join(f"{title:>13}" for _, title, _ in COLUMNS)]
    for row in rows:
        lines.append("  ".join(f"{fmt.format(row[key]):>13}" for key, _, fmt in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("data", nargs="+", help="data sets, the reference first (any MNIST source; "
                        "big ones as make_big_mnist.py writes them)")
    parser.add_argument("--reference-epochs", type=int, default=3, help="epochs of the first data set")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of the others")
    parser.add_argument("--job-args", default="", help="extra flags for every job")
    parser.add_argument("--output", default="growth", help="job outputs, their logs and growth.json")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one job may take")
    args = parser.parse_args(argv)
    missing = [d for d in args.data if not os.path.exists(d)]
    if missing:
        parser.error(f"no such data: {missing[0]}")
    import ray

    from trainer.config import Config
    from trainer.train import cluster

    os.makedirs(args.output, exist_ok=True)
    rows = []
    with cluster.environment(Config()):  # the settings a job's own local Ray has (loopback, niceness 0)
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            address = ray.get_runtime_context().gcs_address
            sampler = StoreSampler(address)
            for i, data in enumerate(args.data):
                epochs = args.reference_epochs if i == 0 else args.epochs
                print(f"{data}: {epochs} epoch{'s' * (epochs > 1)} ...", flush=True)
                sampler.reset()
                row = run_job(data, epochs, address, args.output, shlex.split(args.job_args), args.timeout)
                row["object_store_peak_mb"] = sampler.peak_mb
                row["samples_ratio"] = row["samples_per_second"] / (rows or [row])[0]["samples_per_second"]
                row["start_ratio"] = row["start_to_first_step_s"] / (rows or [row])[0]["start_to_first_step_s"]
                rows.append(row)
                print(format_table([row]).splitlines()[1], flush=True)
            sampler.stop()
        finally:
            ray.shutdown()
    print(format_table(rows))
    path = os.path.join(args.output, "growth.json")
    write_json_atomic(path, {"command": " ".join(map(shlex.quote, [sys.executable, *sys.argv])), "rows": rows})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
