"""Plain Keras against the distributed job, side by side, on the same data in one invocation.

    python scripts/benchmark.py --data ../shared/data/mnist     # about 6 minutes on 2 cores
    python scripts/benchmark.py --smoke                         # committed sample, 1 epoch: a test

Runs, each a fresh subprocess (so its times include Python, TensorFlow and, for the job, Ray):
  a  scripts/plain_keras.py: the tutorial, model.fit in one process
  b  jobs/train_mnist.py, 1 worker given every core (as plain Keras has), global batch 128
  c  2 workers, global batch 128
  csu the streamed run, not pinned (--pin-cpus no; not a default run)
  c32, cu, c0  the same with the gradients all-reduced in float32 (--allreduce-dtype float32), with
     the workers not pinned to cores (--pin-cpus no), and with neither (the job before both): what
     each lever saves (not default runs: `--runs a,b,c,c32,cu,c0`)
  cs the same, each worker streaming its share from the Parquet files (--data-path stream; not a
     default run: `--runs a,c,cs` sets the streaming path beside the in-memory one)
  ct the same as c, tracked in MLflow (--track: the embedded SQLite store, or --tracking-uri's
     server); not a default run: `--runs a,c,ct` prints what tracking costs as ratios to c
  d  2 workers, global batch 512 and 1024, learning rate scaled linearly with 1 epoch of warm-up
  s  the default job (2 workers) submitted with `ray job submit` to a cluster started beforehand
     (scripts/start_cluster.sh, not timed): start counts from the submit command
For each: seconds per epoch (median of epochs 2..N), samples/s, start to first training step,
wall time, peak resident memory of a worker process, test accuracy, console lines; for job runs
also the timeline (trainer/common/timeline.py) and, for in-process runs, the CPU seconds per epoch of every
process around the training workers. Prints them as ratios to (a) and writes
<output>/benchmark.json and benchmark.png (throughput against worker count).
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

from cpu_sampler import CpuSampler  # scripts/, beside this file

from trainer.common.atomic import write_bytes_atomic, write_json_atomic
from trainer.common.cli import script_parser
from trainer.common.net import loopback_port
from trainer.common.timeline import format_timeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SAMPLE = os.path.join(ROOT, "tests", "data", "mnist_sample.npz")
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "mnist")
CORES = os.cpu_count() or 1
SCALED = ("--lr-scaling", "linear", "--warmup-epochs", "1")  # the rule for runs past batch 128
RUNS = {  # key: (label, workers, job flags); key "a" is the plain Keras baseline
    "a": ("plain Keras, 1 process", 1, None),
    "b": (f"job, 1 worker ({CORES} CPUs), batch 128", 1, ("--num-workers", "1", "--cpus-per-worker", str(CORES))),
    "c": ("job, 2 workers, batch 128", 2, ("--num-workers", "2")),
    "c32": ("job, 2 workers, batch 128, float32 all-reduce", 2, ("--num-workers", "2", "--allreduce-dtype", "float32")),
    "cu": ("job, 2 workers, batch 128, not pinned", 2, ("--num-workers", "2", "--pin-cpus", "no")),
    "c0": ("job, 2 workers, batch 128, neither (before)", 2,
           ("--num-workers", "2", "--pin-cpus", "no", "--allreduce-dtype", "float32")),
    "cs": ("job, 2 workers, batch 128, streamed", 2, ("--num-workers", "2", "--data-path", "stream")),
    "csu": ("job, 2 workers, batch 128, streamed, not pinned", 2,
            ("--num-workers", "2", "--data-path", "stream", "--pin-cpus", "no")),
    "ct": ("job, 2 workers, batch 128, tracked in MLflow", 2, ("--num-workers", "2", "--track")),
    "d512": ("job, 2 workers, batch 512", 2, ("--num-workers", "2", "--batch-size", "512", *SCALED)),
    "d1024": ("job, 2 workers, batch 1024", 2, ("--num-workers", "2", "--batch-size", "1024", *SCALED)),
    "s": ("job submitted to a running cluster, 2 workers", 2, ("--num-workers", "2")),
    # For scripts/gpu_benchmark.sh: worker counts (give --job-args '--cpus-per-worker N'), one GPU worker.
    **{f"w{n}": (f"job, {n} worker{'s' * (n > 1)}", n, ("--num-workers", str(n))) for n in (1, 2, 4)},
    "g1": ("job, 1 worker on a GPU", 1, ("--num-workers", "1", "--use-gpu")),
}
DEFAULT_RUNS = ("a", "b", "c", "d512", "d1024", "s")
SUBMITTED = "s"
TRACKED = "ct"
RAY_CLI_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|SUCC|WARNING) \S+\.py:\d+ -- ")
SMOKE_RUNS = ("a", "c")
TARGETS = (  # (run, what, the most it may cost as a ratio to plain Keras's seconds per epoch)
    ("b", "1 worker, seconds per epoch", 1.1),
    ("c", "2 workers at batch 128, seconds per epoch", 1.5),
    ("best", "2 workers at the best batch, seconds per epoch", 1.0),
)
MIN_ACCURACY = 0.978
MAX_START_S = {"in-process": 15.0, "submitted": 12.0}  # process (or `ray job submit`) to first step
MAX_WALL_RATIO = 2.0  # the default job's (run c) wall time against plain Keras's
FIGURES = (  # (key, column title, format)
    ("seconds_per_epoch", "s/epoch", "{:.2f}"),
    ("samples_per_second", "samples/s", "{:,.0f}"),
    ("start_to_first_step_s", "start->step s", "{:.1f}"),
    ("wall_s", "wall s", "{:.1f}"),
    ("peak_rss_mb", "peak MB/proc", "{:,.0f}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("console_lines", "lines", "{:.0f}"),
)


class BenchmarkError(RuntimeError):
    """A run failed or the input is unusable; the message says which, in one line."""


def main(argv: list[str] | None = None) -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--data", help="MNIST (IDX dir, .npz or Parquet); default $MNIST_DATA, "
                        "else ../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every run")
    parser.add_argument("--runs", help=f"which runs, of {', '.join(RUNS)} (default: {','.join(DEFAULT_RUNS)}; "
                        f"with --smoke: {','.join(SMOKE_RUNS)})")
    parser.add_argument("--job-args", default="", help="extra flags for every job run, to try a lever "
                        "(e.g. '--steps-per-call 50')")
    parser.add_argument("--plain-args", default="", help="extra flags for plain Keras (run a), e.g. "
                        "'--threads 4' or '--device gpu'")
    parser.add_argument("--output", default="bench", help="benchmark.json, benchmark.png, run logs")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--tracking-uri", help="the MLflow server run ct tracks to (default: the embedded store "
                        "in its output); only ct tracks, whatever $MLFLOW_TRACKING_URI says")
    parser.add_argument("--smoke", action="store_true", help="the committed sample, 1 epoch: checks the "
                        "benchmark works, measures nothing")
    args = parser.parse_args(argv)
    try:
        results = run_benchmark(args)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(format_table(results), flush=True)
    print(f"wrote {results['json']} and {results['png']}", flush=True)
    return 0


def run_benchmark(args) -> dict:
    data = SAMPLE if args.smoke else (args.data or os.environ.get("MNIST_DATA") or DEFAULT_DATA)
    runs = args.runs or ",".join(SMOKE_RUNS if args.smoke else DEFAULT_RUNS)
    keys = [k.strip() for k in runs.split(",") if k.strip()]
    epochs = 1 if args.smoke else args.epochs
    unknown = [k for k in keys if k not in RUNS]
    if unknown or "a" not in keys:
        raise BenchmarkError(f"--runs must include a (the baseline) and name only {', '.join(RUNS)}; "
                             f"got {runs!r}")
    if epochs < 1:
        raise BenchmarkError(f"--epochs must be at least 1, got {epochs}")
    output = os.path.abspath(args.output)
    storage = os.path.join(output, "ray_results")
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the job runs inherit this environment: only ct tracks
    os.makedirs(os.path.join(output, "logs"), exist_ok=True)
    prepare_s, train_rows = _prepare_data(data, storage)  # once, untimed: a user's second run reuses it
    results = {"machine": _machine(), "data": os.path.abspath(data), "epochs": epochs,
               "train_rows": train_rows, "job_args": args.job_args, "data_preparation_s": prepare_s,
               "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]), "runs": []}
    for key in sorted(keys, key=list(RUNS).index):
        print(f"run {key}: {RUNS[key][0]} ...", flush=True)
        run_one = _run_submitted if key == SUBMITTED else _run_one
        extra = shlex.split(args.plain_args if RUNS[key][2] is None else args.job_args)
        if key == TRACKED and args.tracking_uri:
            extra += ["--tracking-uri", args.tracking_uri]
        run = run_one(key, data, epochs, train_rows, extra, output, storage, args.timeout)
        results["runs"].append(run)
        print(f"  {run['seconds_per_epoch']:.2f} s/epoch, test accuracy {run['test_accuracy']:.4f}, "
              f"wall {run['wall_s']:.1f} s", flush=True)
    results["machine"]["load_average_after"] = os.getloadavg()
    add_ratios(results)
    results["json"] = os.path.join(output, "benchmark.json")
    results["png"] = os.path.join(output, "benchmark.png")
    write_json_atomic(results["json"], results)
    write_bytes_atomic(results["png"], plot_png(results))
    return results


def _prepare_data(data: str, storage: str) -> tuple[float, int]:
    """Validate the data and write the job's Parquet shards where its runs will look: (s, train rows)."""
    from trainer.common import fs as storage_paths
    from trainer.data import shards as mnist_data
    from trainer.train.plan import DATA_DIR

    started = time.perf_counter()
    try:
        _, _, manifest = mnist_data.prepare(mnist_data.resolve_source(data),
                                            storage_paths.join(storage, DATA_DIR))
    except (mnist_data.DataError, ValueError) as exc:
        raise BenchmarkError(str(exc)) from None
    return time.perf_counter() - started, manifest.rows("train")


def _run_one(key: str, data: str, epochs: int, train_rows: int, extra: list[str], output: str,
             storage: str, timeout: float) -> dict:
    label, workers, flags = RUNS[key]
    out_dir = os.path.join(output, "runs", key)
    if flags is None:
        command = [sys.executable, os.path.join(ROOT, "scripts", "plain_keras.py"), "--data", data,
                   "--epochs", str(epochs), *extra]
    else:
        command = [sys.executable, os.path.join(ROOT, "jobs", "train_mnist.py"),
                   *_job_args(key, data, epochs, out_dir, storage, extra)]
    log = os.path.join(output, "logs", f"{key}.log")
    started, code, max_rss_kb, sampler = _timed_subprocess(command, log, timeout)
    ended = time.time()
    if code != 0:
        raise BenchmarkError(f"run {key} ({label}) exited with {code}: {_last_line(log)} (log: {log})")
    run = {"key": key, "label": label, "workers": workers, "command": shlex.join(command), "log": log,
           "wall_s": ended - started, "process_peak_rss_mb": max_rss_kb / 1024,
           "console_lines": _line_count(log)}
    if flags is None:
        summary = json.loads(_last_line(log))
        epoch_seconds = summary["epoch_seconds"]
        process_started = ended - summary["wall_seconds"]  # the script times itself from main()
        run.update(global_batch=128, lr_scaling="none", epoch_seconds=epoch_seconds,
                   seconds_per_epoch=_steady(epoch_seconds),
                   samples_per_second=train_rows / _steady(epoch_seconds),
                   start_to_first_step_s=process_started + summary["start_to_first_step"] - started,
                   peak_rss_mb=max_rss_kb / 1024, test_accuracy=summary["test_accuracy"])
        run["cpu_s_to_first_step"] = _cpu_until(sampler, started, started + run["start_to_first_step_s"])
    else:
        figures, history = _job_figures(os.path.join(out_dir, "metrics.json"), started)
        run.update(figures)
        training = (history[0]["first_step_unix"], history[-1]["first_step_unix"] + history[-1]["seconds"])
        run["cpu_s_per_epoch"] = {name: seconds / len(history) for name, seconds in
                                  sampler.cpu_between(*training).items() if seconds > 0.005}
        run["non_worker_cpu_s_per_epoch"] = sum(seconds for name, seconds in run["cpu_s_per_epoch"].items()
                                                if not name.startswith("ray::RayTrainWorker"))
        run["cpu_s_to_first_step"] = _cpu_until(sampler, started, history[0]["first_step_unix"])
    return run


def _cpu_until(sampler: CpuSampler, started: float, first_step: float) -> dict[str, float]:
    """CPU seconds each process used from the run's start to its first step (where start-up goes)."""
    return {name: round(seconds, 2) for name, seconds in sampler.cpu_between(started, first_step).items()
            if seconds > 0.05}


def _job_args(key: str, data: str, epochs: int, out_dir: str, storage: str, extra: list[str]) -> list[str]:
    """jobs/train_mnist.py's flags for run `key`: its data, epochs, outputs and its own flags."""
    return ["--data", os.path.abspath(data), "--epochs", str(epochs), "--output", out_dir, "--storage-path",
            storage, "--run-name", f"bench-{key}-{time.strftime('%Y%m%d-%H%M%S')}", *RUNS[key][2], *extra]


def _job_figures(metrics_path: str, started: float) -> tuple[dict, list[dict]]:
    """A job run's figures from its metrics.json, timed from `started` (Unix time); and its epochs."""
    with open(metrics_path) as f:
        metrics = json.load(f)
    history, cfg = metrics["epochs"], metrics["config"]
    return dict(global_batch=cfg["batch_size"], lr_scaling=cfg.get("lr_scaling", "none"),
                epoch_seconds=[h["seconds"] for h in history],
                seconds_per_epoch=_steady([h["seconds"] for h in history]),
                samples_per_second=_steady([h["samples_per_second"] for h in history]),
                start_to_first_step_s=history[0]["first_step_unix"] - started,
                peak_rss_mb=max(w["peak_rss_mb"] for w in metrics["workers"]),
                learning_rates=[h["learning_rate"] for h in history],
                test_accuracy=metrics["test_accuracy"], timeline=metrics["timeline"]), history


def _run_submitted(key: str, data: str, epochs: int, train_rows: int, extra: list[str], output: str,
                   storage: str, timeout: float) -> dict:
    """The default job through `ray job submit`, to a one-node cluster started (untimed) for it."""
    import tempfile
    import uuid

    label, workers, _ = RUNS[key]
    out_dir, log = os.path.join(output, "runs", key), os.path.join(output, "logs", f"{key}.log")
    temp_dir = tempfile.mkdtemp(prefix="mnbench-", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": os.path.join(temp_dir, "auth_token")}
    env.pop("RAY_ADDRESS", None)
    ports = [loopback_port() for _ in range(2)]
    start = subprocess.run(["bash", os.path.join(ROOT, "scripts", "start_cluster.sh"), "--port", str(ports[0]),
                            "--dashboard-port", str(ports[1]), "--temp-dir", temp_dir],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if start.returncode != 0:
        raise BenchmarkError(f"scripts/start_cluster.sh failed: {(start.stderr or start.stdout).strip()[-300:]}")
    try:
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        command = [ray, "job", "submit", "--address", f"http://127.0.0.1:{ports[1]}", "--working-dir", ".",
                   "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", f"bench-{uuid.uuid4().hex[:8]}",
                   "--", "python", "jobs/train_mnist.py", *_job_args(key, data, epochs, out_dir, storage, extra)]
        started, code, _, _ = _timed_subprocess(command, log, timeout, env={**env, "RAY_AUTH_MODE": "token"})
        ended = time.time()
    finally:
        subprocess.run(["bash", os.path.join(ROOT, "scripts", "stop_cluster.sh"), "--temp-dir", temp_dir],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)
    if code != 0:
        raise BenchmarkError(f"run {key} ({label}) exited with {code}: {_last_line(log)} (log: {log})")
    run = {"key": key, "label": label, "workers": workers, "command": shlex.join(command), "log": log,
           "wall_s": ended - started, "console_lines": _line_count(log, skip=RAY_CLI_LINE)}
    run.update(_job_figures(os.path.join(out_dir, "metrics.json"), started)[0])
    return run


def _line_count(log: str, skip: re.Pattern | None = None) -> int:
    """Lines in a run's console log; for a submitted run, without `ray job submit`'s own lines (its
    banner, upload notices and status), which are the Ray CLI's, not the job's: what `ray job logs` shows."""
    with open(log) as f:
        return sum(1 for line in f if not (skip and skip.match(line)))


def _timed_subprocess(command: list[str], log: str, timeout: float,
                      env: dict | None = None) -> tuple[float, int, int, CpuSampler]:
    """Run to completion: (start time, exit code, peak RSS of that process in KiB via wait4, the CPU
    samples of its process tree)."""
    env = {**(env or os.environ), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)  # in-process runs start (and time) their own Ray; `s` names its cluster
    with open(log, "w") as out:
        started = time.time()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        sampler = CpuSampler(proc.pid).start()
        deadline = started + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                sampler.stop()
                proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
                return started, proc.returncode, usage.ru_maxrss, sampler
            if time.time() > deadline:
                sampler.stop()
                _stop(proc)
                raise BenchmarkError(f"{os.path.basename(command[1])} ran past --timeout {timeout:g} s "
                                     f"(log: {log})")
            time.sleep(0.1)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the job then shuts its Ray down), then SIGKILL the process group this script made."""
    proc.terminate()
    for _ in range(300):
        if os.wait4(proc.pid, os.WNOHANG)[0]:
            return
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    os.wait4(proc.pid, 0)


def _last_line(path: str) -> str:
    with open(path) as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _steady(values: list[float]) -> float:
    """Median of epochs 2..N: epoch 1 also traces the step function. One epoch: that epoch."""
    return statistics.median(values[1:] or values)


def _machine() -> dict:
    from importlib.metadata import version

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.machine(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "tensorflow": version("tensorflow"),
            "keras": version("keras"), "ray": version("ray"), "load_average_before": os.getloadavg()}


def add_ratios(results: dict) -> None:
    """Each figure of each run over the same figure of run a; then which targets were met."""
    runs = {run["key"]: run for run in results["runs"]}
    base = runs["a"]
    for run in results["runs"]:
        run["ratios"] = {key: run[key] / base[key] for key, _, _ in FIGURES}
    scaled = [r for k, r in runs.items() if k.startswith("d") and r["test_accuracy"] >= MIN_ACCURACY]
    runs["best"] = min(scaled + [r for k, r in runs.items() if k == "c"],
                       key=lambda r: r["seconds_per_epoch"], default=None)
    results["targets"] = []
    for key, what, limit in TARGETS:
        run = runs.get(key)
        if run is not None:
            ratio = run["ratios"]["seconds_per_epoch"]
            accurate = run["workers"] == 1 or run["test_accuracy"] >= MIN_ACCURACY
            results["targets"].append({"run": run["key"], "what": what, "limit": limit, "ratio": ratio,
                                       "basis": f"same epochs ({results['epochs']})",
                                       "test_accuracy": run["test_accuracy"],
                                       "met": ratio <= limit and accurate})
    for run in results["runs"][1:]:
        how = "submitted" if run["key"] == SUBMITTED else "in-process"
        results["targets"].append({"run": run["key"], "what": f"{how} start to first step, seconds",
                                   "limit": MAX_START_S[how], "value": run["start_to_first_step_s"],
                                   "met": run["start_to_first_step_s"] <= MAX_START_S[how]})
    if "c" in runs:
        ratio = runs["c"]["ratios"]["wall_s"]
        results["targets"].append({"run": "c", "what": "default job's wall time against plain Keras",
                                   "limit": MAX_WALL_RATIO, "ratio": ratio, "basis": "end to end",
                                   "test_accuracy": runs["c"]["test_accuracy"], "met": ratio <= MAX_WALL_RATIO})


def format_table(results: dict) -> str:
    """The runs as 'value (ratio to a)', then the targets, as printable text."""
    header = ["run", *[title for _, title, _ in FIGURES]]
    rows = [[f"{run['key']} {run['label']}",
             *[f"{fmt.format(run[key])} ({run['ratios'][key]:.2f}x)" for key, _, fmt in FIGURES]]
            for run in results["runs"]]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))) for row in [header, *rows]]
    machine = results["machine"]
    lines.insert(0, f"{results['epochs']} epochs on {results['data']}; {machine['cpus']} CPUs, "
                    f"load average {machine['load_average_before'][0]:.1f} before, "
                    f"{machine.get('load_average_after', [float('nan')])[0]:.1f} after; "
                    f"figures as value (ratio to run a)")
    runs = {run["key"]: run for run in results["runs"]}
    if "w1" in runs:
        lines.append("scaling efficiency (samples/s over workers x 1-worker samples/s): " + ", ".join(
            f"{n} workers {runs[f'w{n}']['samples_per_second'] / (n * runs['w1']['samples_per_second']):.0%}"
            for n in (1, 2, 4) if f"w{n}" in runs))
    for run in results["runs"]:
        if "timeline" in run:
            lines.append(f"timeline {run['key']}: {format_timeline(run['timeline'])}")
        if run.get("cpu_s_to_first_step"):
            used = run["cpu_s_to_first_step"]
            lines.append(f"CPU s to the first step {run['key']}: {sum(used.values()):.1f} of "
                         f"{results['machine']['cpus'] * run['start_to_first_step_s']:.1f} (CPUs x seconds): "
                         + ", ".join(f"{name} {seconds:.1f}" for name, seconds in used.items()))
        if "cpu_s_per_epoch" in run:
            lines.append(f"CPU s/epoch {run['key']}: " + ", ".join(
                f"{name} {seconds:.2f}" for name, seconds in run["cpu_s_per_epoch"].items())
                + f"; all but the train workers {run['non_worker_cpu_s_per_epoch']:.2f}")
    if "c" in runs and TRACKED in runs:
        c, ct = runs["c"], runs[TRACKED]
        lines.append(f"tracking (ct over c): s/epoch {ct['seconds_per_epoch'] / c['seconds_per_epoch']:.2f}x, start to "
                     f"first step {ct['start_to_first_step_s'] / c['start_to_first_step_s']:.2f}x "
                     f"(+{ct['start_to_first_step_s'] - c['start_to_first_step_s']:.1f} s), wall "
                     f"{ct['wall_s'] / c['wall_s']:.2f}x (+{ct['wall_s'] - c['wall_s']:.1f} s)")
    for target in results["targets"]:
        shown = (f"{target['ratio']:.2f}x (limit {target['limit']}x), test accuracy "
                 f"{target['test_accuracy']:.4f}" if "ratio" in target
                 else f"{target['value']:.1f} s (limit {target['limit']:g} s)")
        lines.append(f"target {'MET ' if target['met'] else 'MISSED'} run {target['run']}: "
                     f"{target['what']}: {shown}")
    return "\n".join(lines)


def plot_png(results: dict) -> bytes:
    """Samples per second against worker count, one line per global batch, plain Keras as a line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    jobs = [run for run in results["runs"] if run["key"] != "a"]
    for batch in sorted({run["global_batch"] for run in jobs}):
        points = sorted((run["workers"], run["samples_per_second"]) for run in jobs
                        if run["global_batch"] == batch)
        ax.plot(*zip(*points), marker="o", label=f"job, global batch {batch}")
    base = next(run for run in results["runs"] if run["key"] == "a")
    ax.axhline(base["samples_per_second"], color="gray", linestyle="--", label="plain Keras")
    ax.set(xlabel="workers", ylabel="training samples / s (median epoch)",
           title=f"MNIST MLP throughput, {results['machine']['cpus']} CPUs")
    ax.set_xticks(sorted({run["workers"] for run in jobs} | {1}))
    ax.set_ylim(0, 1.3 * max(run["samples_per_second"] for run in results["runs"]))  # room for the legend
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


if __name__ == "__main__":
    sys.exit(main())
