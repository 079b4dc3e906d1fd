"""The job on a cluster of real hosts: network namespaces with addresses and Ray temp dirs of their
own, joined by a bridge, token auth on (tests/hosts.py). A head with no CPUs, two 1-CPU hosts.

What a person reads is asserted here, not only the files: every epoch line once, a bounded console,
no tracebacks or library notices for what the job handles itself, no colour codes in a redirected
log. Needs root and `ip netns` (CI runs as root); skips, saying why, where they are missing.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime

import pytest

from tests import hosts
from tests.conftest import JOB, ROOT, SAMPLE, read_metrics

pytestmark = pytest.mark.ray

NOISE = ["Traceback", "Error in control loop", "WorkerGroupStartupTimeoutError", "Starting execution of Dataset",
         "Execution plan of Dataset", "Progress bars disabled", "execution finished", "Failed to query Ray Train",
         "(raylet)", "\x1b["]


@pytest.fixture(scope="module", autouse=True)
def _hosts_can_run_here():
    """Root and `ip netns`, checked when the tests run (not when they are collected)."""
    reason = hosts.available()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    with hosts.Hosts(workers=2, worker_cpus=1, dashboard=True) as running:
        yield running


def assert_quiet(console: str, epochs: int, max_lines: int) -> list[str]:
    """Every epoch 1..epochs printed once and in order, no noise, at most max_lines lines. Returns
    the epoch lines."""
    lines = console.splitlines()
    noisy = [line for line in lines if any(word in line for word in NOISE)]
    assert not noisy, "\n".join(noisy[:10])
    shown = [line for line in lines if re.match(r"epoch \d+/\d+ ", line)]
    assert [int(re.match(r"epoch (\d+)/", line).group(1)) for line in shown] == list(range(1, epochs + 1)), console
    assert len(lines) <= max_lines, f"{len(lines)} lines:\n{console}"
    return shown


def train_args(running: hosts.Hosts, name: str, *args: str) -> list[str]:
    return ["--data", str(SAMPLE), "--output", str(running.root / name / "out"),
            "--storage-path", str(running.root / name / "runs"), *args]


def print_time_lost(running: hosts.Hosts, cut_at: float, metrics: dict) -> None:
    """Where the time between the link going down and the first step after it went (with -s; the
    figures in docs/operations.md)."""
    dead = None
    for log in running.head.temp_dir.glob("session_*/logs/gcs_server.out"):
        for line in log.read_text(errors="replace").splitlines():
            if "Node is dead because the health check failed" in line and dead is None:
                dead = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    (resize,) = metrics["resizes"]
    (restart,) = metrics["restarts"]
    marks = {"the last step before it ends": resize["at_unix"] - resize["gap_seconds"],
             "the restart line (the survivor's collective failed)": restart["at_unix"],
             "Ray marks the host dead (its health check)": dead,
             "the first step after it, on 1 worker": resize["at_unix"]}
    for what, at in sorted(marks.items(), key=lambda item: item[1] or 0):
        print(f"  {at - cut_at:6.1f} s  {what}" if at else f"     n/a  {what}")


# First in the file: its cluster is its own, and the module's (below) is not up yet.
def test_a_host_whose_link_goes_down_costs_an_elastic_run_one_resize_and_no_noise():
    """A head without a dashboard (the cleaner's state API is missing), an elastic run on both
    hosts; one host's link goes down mid-run, silently. The run shrinks to one worker and finishes
    every epoch, its console one line for the resize and nothing Ray handled by itself."""
    epochs = 30
    with hosts.Hosts(workers=2, worker_cpus=1, dashboard=False) as running:
        proc = running.popen(running.head, [sys.executable, str(JOB), "--address", running.gcs,
                                            *train_args(running, "elastic", "--num-workers", "1-2",
                                                        "--epochs", str(epochs))],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        console, cut_at = [], None
        timer = threading.Timer(600, proc.kill)  # a job must never hang; if it does, this test says so
        timer.start()
        try:
            for line in proc.stdout:
                console.append(line)
                if line.startswith("epoch 3/"):
                    cut_at = time.time()
                    running.cut(running.hosts[2])
                    break
            console += proc.stdout.readlines()  # to the end: Hosts.close() kills it if it hangs
            proc.wait(timeout=600)
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
        text = "".join(console)
        assert cut_at, f"the run never reached epoch 3:\n{text[-5000:]}"
        print(f"{text}\nlink down to exit: {time.time() - cut_at:.1f} s; {len(console)} console lines")
        assert proc.returncode == 0, text[-5000:]
        metrics = read_metrics(running.root / "elastic" / "out")
        print_time_lost(running, cut_at, metrics)
    assert metrics["workers"] and all(w["node_ip"] == running.hosts[1].address for w in metrics["workers"])
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, epochs + 1))
    # One line for the lost host: the restart line says why, the next epoch's line to what size.
    assert sum(line.startswith("restarted after a worker failure") for line in console) == 1, text
    shown = assert_quiet(text, epochs=epochs, max_lines=epochs + 25)
    assert sum(line.endswith("(resized from 2)") for line in shown) == 1, text


def test_spread_puts_one_worker_on_each_host_with_its_own_address(cluster):
    proc = cluster.run(cluster.head, [sys.executable, str(JOB), "--address", cluster.gcs,
                                      *train_args(cluster, "spread", "--num-workers", "2", "--epochs", "3",
                                                  "--placement-strategy", "SPREAD")], timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = read_metrics(cluster.root / "spread" / "out")
    assert sorted(w["node_ip"] for w in metrics["workers"]) == [h.address for h in cluster.hosts[1:]]
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]
    assert_quiet(proc.stdout + proc.stderr, epochs=3, max_lines=40)


def test_a_submitted_job_prints_every_epoch_once_and_nothing_else(cluster):
    """`ray job submit` from the head, as jobs/runtime_env.yaml and the README have it; its console
    is what a person follows: the job's lines, framed by the CLI's own few."""
    proc = cluster.run(cluster.head, [
        cluster.ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", ".",
        "--runtime-env", "jobs/runtime_env.yaml", "--submission-id", f"hosts-{uuid.uuid4().hex[:8]}", "--",
        "python", "jobs/train_mnist.py",
        *train_args(cluster, "submitted", "--num-workers", "2", "--epochs", "3")], timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # The job's lines, between the CLI's "Tailing logs" and its closing frame (Ray's CLI colours
    # that frame even in a pipe; the job's lines themselves must not be).
    job = proc.stdout.split("Tailing logs until the job exits")[-1].split("SUCC cli.py")[0]
    print(job)
    assert_quiet(job, epochs=3, max_lines=40)
    assert (cluster.root / "submitted" / "out" / "mnist.h5").exists()
