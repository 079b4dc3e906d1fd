"""Shared test helpers: the committed MNIST sample, and running the real job in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "mnist_sample.npz"  # 3,000 train + 1,000 test real MNIST digits
JOB = ROOT / "jobs" / "train_mnist.py"


def run_job(*args: str, timeout: float = 420, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run jobs/train_mnist.py as a user would; never a local Ray left behind (it is in-process)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None) if "RAY_ADDRESS" not in (env or {}) else None
    return subprocess.run([sys.executable, str(JOB), *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_metrics(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="session")
def full_mnist() -> str:
    """Full MNIST from $MNIST_DATA (CI sets it from ../shared/data/mnist); skip without it."""
    path = os.environ.get("MNIST_DATA")
    if not path or not os.path.exists(path):
        pytest.skip("full MNIST not available: set MNIST_DATA")
    return path


def simulated_cluster(head_cpus: int, node_cpus: list[int]):
    """A multi-node Ray cluster on this host, the way Ray's own tests build one (context manager);
    every node on loopback, no dashboard. The job joins it with --address cluster.address."""
    import contextlib

    from ray.cluster_utils import Cluster

    @contextlib.contextmanager
    def running():
        loopback = {"node_ip_address": "127.0.0.1", "include_dashboard": False}
        cluster = Cluster(initialize_head=True, head_node_args={**loopback, "num_cpus": head_cpus})
        try:
            for cpus in node_cpus:
                cluster.add_node(**loopback, num_cpus=cpus)
            cluster.wait_for_nodes()
            yield cluster
        finally:
            cluster.shutdown()

    return running()
