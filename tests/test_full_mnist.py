"""Full MNIST with the default recipe at 1, 2 and 4 workers (slow: about 10 minutes on 2 cores).
CI runs it with MNIST_DATA set. The global batch stays 128 whatever the worker count."""

import pytest

from tests.conftest import read_metrics, run_job

WORKER_COUNTS = (1, 2, 4)


@pytest.fixture(scope="module")
def accuracies(full_mnist, tmp_path_factory):
    results = {}
    for workers in WORKER_COUNTS:
        output = tmp_path_factory.mktemp(f"full{workers}")
        proc = run_job("--data", full_mnist, "--num-workers", str(workers), "--output", str(output),
                       "--local-cpus", str(max(WORKER_COUNTS) + 1), timeout=1500)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = read_metrics(output)
        assert len(metrics["epochs"]) == 5 and metrics["config"]["batch_size"] == 128
        results[workers] = metrics["test_accuracy"]
    print(f"full MNIST test accuracy by worker count: {results}")
    return results


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_default_recipe_reaches_tutorial_accuracy_at_every_worker_count(accuracies):
    assert all(accuracy >= 0.978 for accuracy in accuracies.values()), accuracies


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_worker_count_moves_accuracy_by_at_most_0_3_points(accuracies):
    assert max(accuracies.values()) - min(accuracies.values()) <= 0.003, accuracies
