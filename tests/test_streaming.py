"""The streaming data path at a size where it matters: sets of a few hundred thousand rows grown
from the committed sample by scripts/make_big_mnist.py, trained by the real job on a real Ray.

- 600,000 rows, default flags: the job picks the streaming path by size, the shares cover the
  data, and the driver and every worker stay under memory bounds that the in-memory path breaks
  at this size (measured, below).
- 210,000 rows (a share divides evenly at 1, 2 and 3 workers): an elastic run that loses a node and
  continues at 2 workers, and an interrupted run resumed at 1 worker, replan their shares at each
  size and still run every step at the global batch over disjoint shares that cover the data.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import (
    ROOT,
    SAMPLE,
    assert_each_epoch_once_with_a_restart,
    assert_each_step_used_the_global_batch,
    read_metrics,
    run_job,
    simulated_cluster,
    start_job,
    wait_for_epoch,
)
from trainer.train.elastic import RERUN, SHRANK

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# Peak RSS at 600,000 rows, 2 workers, 1 epoch, 2 cores (scripts/data_growth.py): the streaming
# path measured 895 MB (driver) and 1,040 MB (worker); the in-memory path (--data-path memory), which
# holds the split in the driver twice and each worker's shard twice, 2,509 and 1,824 MB.
DRIVER_MB, WORKER_MB = 1500, 1600
SMALL = ["--batch-size", "512", "--lr-scaling", "linear", "--stall-timeout-s", "30"]


def grow(tmp_path_factory, rows: int):
    """`rows` training rows grown from the sample, in files of 10,000 rows (the job's own layout)."""
    path = tmp_path_factory.mktemp("big") / f"mnist-{rows}"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_big_mnist.py"), "--rows", str(rows), "--output",
                    str(path), "--data", str(SAMPLE), "--rows-per-file", "10000"],
                   check=True, capture_output=True, timeout=600)
    return path


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    return grow(tmp_path_factory, 210_000)


@pytest.mark.timeout(900)
def test_a_big_set_streams_with_flat_memory_and_shares_that_cover_it(tmp_path_factory):
    big = grow(tmp_path_factory, 600_000)
    out = tmp_path_factory.mktemp("streamed")
    proc = run_job("--data", str(big), "--epochs", "1", "--output", str(out / "out"),
                   "--storage-path", str(out / "runs"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "each worker streams its share from the files (--data-path auto)" in proc.stdout
    metrics = read_metrics(out / "out")
    assert metrics["data"]["streamed"] and [w["rows"] for w in metrics["workers"]] == [300_000, 300_000]
    assert_each_step_used_the_global_batch(metrics, 600_000)
    assert metrics["driver_peak_rss_mb"] < DRIVER_MB, metrics["driver_peak_rss_mb"]
    assert max(w["peak_rss_mb"] for w in metrics["workers"]) < WORKER_MB, metrics["workers"]
    assert metrics["test_accuracy"] > 0.8  # 600,000 steps' worth of the sample's 3,000 digits, distorted
    print(f"600,000 rows streamed: driver {metrics['driver_peak_rss_mb']:.0f} MB, workers "
          f"{[round(w['peak_rss_mb']) for w in metrics['workers']]} MB, "
          f"{metrics['epochs'][0]['samples_per_second']:,.0f} samples/s")


@pytest.mark.timeout(900)
def test_an_elastic_run_replans_its_streamed_shares_when_it_shrinks(tmp_path, medium):
    with simulated_cluster(head_cpus=0, node_cpus=[1, 1, 1]) as cluster:
        proc = start_job("--data", str(medium), "--data-path", "stream", "--epochs", "3", *SMALL,
                         "--address", cluster.address, "--num-workers", "1-3", "--max-failures", "1",
                         "--run-name", "shrink", "--storage-path", str(tmp_path / "runs"),
                         "--output", str(tmp_path / "out"))
        with open(os.path.join(wait_for_epoch(tmp_path / "runs" / "shrink", 1, proc, timeout=600),
                               "workers", "rank-1.json")) as f:
            lost = json.load(f)["node_id"]
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == lost), allow_graceful=False)
        out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert metrics["world_sizes"] == [3] * (restart - 1) + [2] * (4 - restart)
    assert [(r["from"], r["to"], r["reason"]) for r in metrics["resizes"]] == [(3, 2, SHRANK)]
    assert_each_step_used_the_global_batch(metrics, 210_000)  # shares of 70,000, then of 105,000


@pytest.mark.timeout(900)
def test_an_interrupted_streamed_run_resumes_at_another_size(tmp_path, medium):
    args = ["--data", str(medium), "--data-path", "stream", "--epochs", "2", *SMALL, "--run-name", "term",
            "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]
    proc = start_job(*args)
    wait_for_epoch(tmp_path / "runs" / "term", 1, proc, timeout=600)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    rerun = run_job(*args, "--num-workers", "1", timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout and "each worker streams its share" in rerun.stdout
    metrics = read_metrics(tmp_path / "out")
    assert metrics["world_sizes"] == [2, 1] and [(r["from"], r["to"], r["reason"]) for r in metrics["resizes"]] == [
        (2, 1, RERUN)]
    assert_each_step_used_the_global_batch(metrics, 210_000)
