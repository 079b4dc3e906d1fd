"""Placement on a simulated 2-node cluster (ray.cluster_utils.Cluster on one machine, loopback)."""

import pytest

from tests.conftest import SAMPLE, read_metrics, run_job, simulated_cluster

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray


def test_spread_puts_one_worker_on_each_node_and_trains(tmp_path):
    # The head has 2 CPUs, the other node 1; SPREAD still puts one worker on each node.
    with simulated_cluster(head_cpus=2, node_cpus=[1]) as cluster:
        nodes = {n.node_id for n in [cluster.head_node, *cluster.worker_nodes]}
        proc = run_job("--address", cluster.address, "--data", str(SAMPLE), "--num-workers", "2",
                       "--epochs", "2", "--placement-strategy", "SPREAD", "--output", str(tmp_path / "out"),
                       "--storage-path", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path / "out")
    assert {w["node_id"] for w in metrics["workers"]} == nodes  # one worker on each of the 2 nodes
    assert metrics["epochs"][-1]["loss"] < metrics["epochs"][0]["loss"]
