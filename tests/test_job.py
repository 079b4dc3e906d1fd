"""The real job, end to end: local Ray, Ray Train workers, TensorFlow, on the committed sample."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SAMPLE, assert_each_step_used_the_global_batch, gpu_count, read_metrics, run_job

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray

SAMPLE_TRAIN_ROWS = 3000
EPOCHS = 5  # under a second each on the sample: about 0.91 test accuracy
WORKER_COUNTS = (1, 2)  # 4 workers run on full MNIST (tests/test_full_mnist.py), shards checked there too


@pytest.fixture(scope="module", params=WORKER_COUNTS, ids=[f"{n}-workers" for n in WORKER_COUNTS])
def finished(request, tmp_path_factory):
    output = tmp_path_factory.mktemp(f"out{request.param}")
    proc = run_job("--data", str(SAMPLE), "--num-workers", str(request.param), "--epochs", str(EPOCHS),
                   "--local-cpus", str(max(WORKER_COUNTS)), "--output", str(output))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return request.param, output, proc


def test_job_trains_and_reports_every_epoch(finished):
    workers, output, proc = finished
    metrics = read_metrics(output)
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, EPOCHS + 1)) and metrics["num_workers"] == workers
    assert epochs[-1]["loss"] < epochs[0]["loss"]  # the loss falls
    assert all(e["seconds"] > 0 and e["samples_per_second"] > 0 for e in epochs)
    assert metrics["test_accuracy"] > 0.85  # 5 epochs on 3,000 digits reach about 0.91; chance is 0.1
    assert f"test accuracy: {metrics['test_accuracy']:.4f}" in proc.stdout


def test_the_console_shows_one_line_per_epoch_and_no_library_chatter(finished):
    """What a user reads: the data, the run, one line per epoch (from rank 0 only, unprefixed), the
    evaluation table and where the model went. Ray's per-report lines and TensorFlow's C++ notices
    stay in Ray's log files."""
    workers, _, proc = finished
    lines = (proc.stdout + proc.stderr).splitlines()
    epoch_lines = [line for line in lines if line.startswith("epoch ")]
    assert [line.split()[1] for line in epoch_lines] == [f"{e}/{EPOCHS}" for e in range(1, EPOCHS + 1)]
    assert len(lines) <= 30, "\n".join(lines)
    for chatter in ("Reporting training result", "Checkpoint successfully created", "absl::InitializeLog",
                    "cuda", "WARNING", "Traceback", "(RayTrainWorker", "PreemptionWatcher"):
        assert not [line for line in lines if chatter in line], chatter


def test_metrics_keep_a_timeline_of_where_the_time_went(finished):
    _, output, _ = finished
    timeline = read_metrics(output)["timeline"]
    order = ["process_start", "ray_up", "training_launched", "worker_started", "tensorflow_imported",
             "shard_in_memory", "collectives_ready", "first_step", "last_step", "training_done",
             "evaluation_done", "outputs_written"]
    assert [name for name in timeline if name in order] == order
    seconds = [timeline[name] for name in order]
    assert seconds[0] == 0 and seconds == sorted(seconds)
    assert read_metrics(output)["wall_seconds"] == timeline["outputs_written"]


def test_workers_trained_on_disjoint_equal_shards_covering_the_sample(finished):
    workers, output, _ = finished
    shards = read_metrics(output)["workers"]
    assert [s["rank"] for s in shards] == list(range(workers))
    assert {s["rows"] for s in shards} == {SAMPLE_TRAIN_ROWS // workers}  # equal: same step counts
    assert len({s["index_sha256"] for s in shards}) == workers
    assert all(s["global_rows_seen"] == SAMPLE_TRAIN_ROWS for s in shards)  # cover
    assert all(s["global_rows_duplicated"] == 0 for s in shards)  # disjoint
    assert_each_step_used_the_global_batch(read_metrics(output), SAMPLE_TRAIN_ROWS)


def test_each_worker_of_the_jobs_own_ray_ran_on_cores_of_its_own(finished):
    """--pin-cpus auto on a Ray the job started: worker i on core i, when the machine has the cores
    (a worker alone gets both of --local-cpus 2's cores only with --cpus-per-worker 2: here one)."""
    workers, output, _ = finished
    cores = [s["cores"] for s in read_metrics(output)["workers"]]
    available = sorted(os.sched_getaffinity(0))
    assert cores == [[available[rank]] for rank in range(workers)] if len(available) >= workers else [None] * workers


def test_saved_model_loads_in_a_fresh_process_and_matches_metrics(finished):
    _, output, _ = finished
    script = f"""
import json, keras, numpy as np
with np.load({str(SAMPLE)!r}) as npz:
    x, y = npz["x_test"].reshape(-1, 784).astype("float32") / 255, npz["y_test"]
for name in ("mnist.keras", "mnist.h5"):
    model = keras.saving.load_model({str(output)!r} + "/" + name)
    print(json.dumps(float((model.predict(x, verbose=0).argmax(1) == y).mean())))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    accuracies = [json.loads(line) for line in proc.stdout.split()]
    expected = read_metrics(output)["test_accuracy"]
    assert accuracies == pytest.approx([expected, expected], abs=1e-6)


def test_evaluation_report_and_plots_agree_with_metrics(finished):
    _, output, proc = finished
    metrics = read_metrics(output)
    evaluation = json.loads((output / "evaluation.json").read_text())
    assert evaluation["accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert evaluation["examples"] == 1000 and sum(map(sum, evaluation["confusion_matrix"])) == 1000
    assert "weighted avg" in proc.stdout  # the report table is printed at the end of the job
    for name in ("training_curves.png", "confusion_matrix.png", "misclassified.png"):
        assert (output / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_temporary_files_are_left_in_the_output(finished):
    _, output, _ = finished
    names = {p.name for p in output.iterdir()}
    assert {"mnist.keras", "mnist.h5", "metrics.json"} <= names
    assert not [n for n in names if n.startswith(".")]


def test_a_worker_count_the_cluster_cannot_fit_fails_fast(tmp_path):
    started = time.monotonic()
    proc = run_job("--data", str(SAMPLE), "--num-workers", "8", "--local-cpus", "3", "--output",
                   str(tmp_path), timeout=120)  # --local-cpus: 8 would fit on a 16-core machine
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: asked for 8 workers x 1 CPU; the cluster has 3 CPUs and 0 GPUs. "
        "Use fewer --num-workers or --cpus-per-worker, or a bigger cluster")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "mnist.keras").exists()


def test_waiting_for_an_autoscaler_is_announced_and_bounded(tmp_path):
    started = time.monotonic()
    proc = run_job("--data", str(SAMPLE), "--num-workers", "8", "--local-cpus", "3", "--resource-wait-s", "6",
                   "--output", str(tmp_path), timeout=120)
    assert proc.returncode == 1
    assert "waiting up to 6s for the autoscaler: asked for 8 workers" in proc.stdout
    assert "(after waiting 6s)" in proc.stderr.strip().splitlines()[-1]
    assert 6 <= time.monotonic() - started < 70


def test_an_unreachable_cluster_address_fails_fast_before_data_work(tmp_path):
    proc = run_job("--data", str(SAMPLE), "--address", "127.0.0.1:9", "--output", str(tmp_path),
                   "--storage-path", str(tmp_path / "runs"), timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot reach the Ray cluster at 127.0.0.1:9")
    assert not (tmp_path / "runs").exists()


def test_use_gpu_trains_on_a_gpu_or_fails_before_training_without_one(tmp_path):
    """On a machine with a GPU (the device machine) one worker trains on it; on one without, the job
    says so in one line before any training."""
    proc = run_job("--data", str(SAMPLE), "--use-gpu", "--num-workers", "1", "--epochs", "1",
                   "--output", str(tmp_path), timeout=300)
    if gpu_count():
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert read_metrics(tmp_path)["config"]["use_gpu"] is True
    else:
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1].startswith("error: --use-gpu asked for 1 workers x 1 CPU + 1 GPU")
        assert not (tmp_path / "mnist.keras").exists()


def test_bad_data_fails_before_ray_starts(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    proc = run_job("--data", str(tmp_path / "junk.npz"), "--output", str(tmp_path), timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "not a readable .npz" in proc.stderr and "ray" not in proc.stdout.lower()


def test_a_run_whose_outputs_were_lost_is_evaluated_again_without_training(finished, tmp_path):
    """Training finished but its published outputs are gone (a crash while saving): a rerun with the
    same name evaluates the last checkpoint; its timeline has only this process's points."""
    workers, output, _ = finished
    if workers != 1:
        pytest.skip("one worker count is enough")
    run = read_metrics(output)["run"]
    shutil.rmtree(Path(run["storage_path"]) / run["name"] / "model")
    proc = run_job("--data", str(SAMPLE), "--num-workers", "1", "--epochs", str(EPOCHS), "--run-name", run["name"],
                   "--storage-path", run["storage_path"], "--output", str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run {run['name']} finished training; evaluating its last checkpoint" in proc.stdout
    metrics = read_metrics(tmp_path)
    assert metrics["test_accuracy"] == pytest.approx(read_metrics(output)["test_accuracy"], abs=1e-6)
    assert list(metrics["timeline"]) == ["process_start", "evaluation_done", "outputs_written"]
    assert "first training step" not in proc.stdout.splitlines()[-1]


def test_the_token_file_of_the_jobs_own_ray_is_owner_only(tmp_path):
    """Ray 2.60 turns token auth on for a local Ray and, with no token, writes ~/.ray/auth_token with
    the umask (0644 here), which a later `ray start` reuses. The job writes it owner-only first
    (tests/test_token.py); here, one that others could read (an older run's) is made owner-only with
    one line saying so, and the job's Ray runs with it: the same token, not a new file."""
    token = tmp_path / "home" / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("c" * 64)
    token.chmod(0o644)
    proc = run_job("--data", str(SAMPLE), "--epochs", "1", "--num-workers", "1", "--output", str(tmp_path / "out"),
                   env={"HOME": str(token.parent.parent)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert token.stat().st_mode & 0o777 == 0o600 and token.read_text() == "c" * 64
    notes = [line for line in proc.stderr.splitlines() if "token" in line]
    assert notes == [f"note: Ray's token file {token} could be read by others (mode 644); it is owner-only now "
                     "(600). Anyone who read it holds the token: remove the file for a new one"], proc.stderr
