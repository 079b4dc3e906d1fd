"""Full MNIST with the default recipe at 1, 2 and 4 workers (slow: about 4 minutes on 2 cores).
CI runs it with MNIST_DATA set. The global batch stays 128 whatever the worker count.

What the thresholds rest on. The recipe's test accuracy moves from run to run and machine to
machine with the shuffle order and the float summation order: measured runs of it (plain Keras and
the job at 1, 2 and 4 workers, on three machines) lie between 0.9777 and 0.9811, mean about 0.9795,
standard deviation about 0.0013. So one run is held only to 0.975 (3.5 standard deviations below
the mean: it fails on a real regression, not on a draw), and the mean of the three worker counts to
0.977 (3 standard deviations of a mean of three), and the spread between worker counts to 0.6
points (3.3 standard deviations of the difference of two runs). The previous form of this test held
each single run to 0.978, inside that noise, and failed CI with 0.9777 at 2 workers.
"""

import statistics

import pytest

from tests.conftest import assert_each_step_used_the_global_batch, read_metrics, run_job

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray

WORKER_COUNTS = (1, 2, 4)
ONE_RUN_FLOOR = 0.975
MEAN_FLOOR = 0.977
MAX_SPREAD = 0.006  # 3.3 standard deviations of the difference of two runs


@pytest.fixture(scope="module")
def accuracies(full_mnist, tmp_path_factory):
    results = {}
    for workers in WORKER_COUNTS:
        output = tmp_path_factory.mktemp(f"full{workers}")
        proc = run_job("--data", full_mnist, "--num-workers", str(workers), "--output", str(output),
                       "--local-cpus", str(max(WORKER_COUNTS)), timeout=1500)
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = read_metrics(output)
        assert len(metrics["epochs"]) == 5 and metrics["config"]["batch_size"] == 128
        shards = metrics["workers"]
        assert {w["rows"] for w in shards} == {60000 // workers} and len({w["index_sha256"] for w in shards}) == workers
        assert all(w["global_rows_seen"] == 60000 and w["global_rows_duplicated"] == 0 for w in shards)
        assert_each_step_used_the_global_batch(metrics, 60000)  # 128 at every worker count
        results[workers] = metrics["test_accuracy"]
    print(f"full MNIST test accuracy by worker count: {results}")
    return results


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_every_worker_count_trains_the_tutorial_model(accuracies):
    assert all(accuracy >= ONE_RUN_FLOOR for accuracy in accuracies.values()), accuracies


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_worker_counts_together_reach_the_tutorial_accuracy(accuracies):
    assert statistics.mean(accuracies.values()) >= MEAN_FLOOR, accuracies


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_the_worker_count_does_not_move_accuracy_beyond_run_to_run_noise(accuracies):
    assert max(accuracies.values()) - min(accuracies.values()) <= MAX_SPREAD, accuracies
