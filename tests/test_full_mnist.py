"""Full MNIST with the default recipe (slow: minutes). CI runs it with MNIST_DATA set."""

import pytest

from tests.conftest import read_metrics, run_job


@pytest.mark.slow
def test_default_recipe_on_two_workers_reaches_tutorial_accuracy(full_mnist, tmp_path):
    proc = run_job("--data", full_mnist, "--num-workers", "2", "--output", str(tmp_path), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(tmp_path)
    assert len(metrics["epochs"]) == 5 and metrics["config"]["batch_size"] == 128
    assert metrics["test_accuracy"] >= 0.978
