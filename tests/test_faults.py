"""Faults really injected: a SIGKILLed worker, a SIGTERMed driver, a truncated checkpoint, a lost node.

Each run is the real job on the committed sample with the same seed; epochs are made longer with a
small batch so a fault lands mid-run. About five minutes in all on 2 cores.
"""

import json
import os
import shutil
import signal
import time

import pytest

from tests.conftest import SAMPLE, read_metrics, run_job, simulated_cluster
from tests.conftest import start_job as start_any_job

RECIPE = ["--data", str(SAMPLE), "--epochs", "5", "--batch-size", "32", "--seed", "0"]


def start_job(*args):
    return start_any_job(*RECIPE, *args)


def finish(proc, timeout=420):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_epoch(run_dir, epochs_done, proc, timeout=300) -> str:
    """The checkpoint folder of the first epoch >= `epochs_done` that Ray Train has registered, read
    from the snapshot its checkpoint manager keeps in storage (a checkpoint folder alone may not
    be registered yet: a fault then would rightly restart from the one before)."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the job ended before the fault could be injected"
        try:
            with open(snapshot) as f:
                latest = json.load(f)["latest_checkpoint_result"]
            if latest and latest["metrics"]["epoch"] >= epochs_done:
                return os.path.join(run_dir, latest["checkpoint_dir_name"])
        except (OSError, ValueError, KeyError):
            pass  # not written yet, or being replaced
        time.sleep(0.05)
    raise TimeoutError(f"no registered checkpoint with {epochs_done} epochs in {run_dir}")


def worker_pid(checkpoint_dir, rank):
    """The training worker's pid, as its actor reported it (never found by process name)."""
    with open(os.path.join(checkpoint_dir, "workers", f"rank-{rank}.json")) as f:
        return json.load(f)["pid"]


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory):
    base = tmp_path_factory.mktemp("undisturbed")
    code, out, err = finish(start_job("--output", str(base / "out"), "--storage-path", str(base / "runs")))
    assert code == 0, err[-3000:]
    return read_metrics(base / "out")


def assert_each_epoch_once_with_a_restart(metrics):
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [1, 2, 3, 4, 5]
    restarts = [e["epoch"] for e in epochs if e["restarted"]]
    assert len(restarts) == 1 and restarts[0] >= 2  # resumed from a checkpoint, not from epoch 0
    return restarts[0]


def test_worker_sigkill_restarts_from_checkpoint(tmp_path, undisturbed):
    proc = start_job("--max-failures", "1", "--run-name", "kill", "--storage-path", str(tmp_path / "runs"),
                     "--output", str(tmp_path / "out"))
    checkpoint_dir = wait_for_epoch(tmp_path / "runs" / "kill", 2, proc)
    victim = worker_pid(checkpoint_dir, rank=1)
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert restart >= 3  # epoch 2's checkpoint was registered before the kill: nothing before it redone
    assert victim not in [w["pid"] for w in metrics["workers"]]  # a new worker group finished it
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A run whose driver got SIGTERM after epoch 2, plus a pristine copy of its storage."""
    base = tmp_path_factory.mktemp("interrupted")
    args = ["--run-name", "term", "--storage-path", str(base / "runs"), "--output", str(base / "out")]
    proc = start_job(*args)
    checkpoint_dir = wait_for_epoch(base / "runs" / "term", 2, proc)
    pids = [worker_pid(checkpoint_dir, rank) for rank in (0, 1)]
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc, timeout=120)
    shutil.copytree(base / "runs", base / "runs-copy")
    return {"base": base, "args": args, "code": code, "err": err, "worker_pids": pids}


def test_driver_sigterm_stops_workers_and_keeps_a_checkpoint(interrupted):
    assert interrupted["code"] == 130, interrupted["err"][-3000:]
    assert "interrupted; the latest checkpoint is kept" in interrupted["err"]
    deadline = time.monotonic() + 30  # Ray stops its workers as the job exits; give it a bounded while
    while [pid for pid in interrupted["worker_pids"] if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in interrupted["worker_pids"] if alive(pid)]
    assert not (interrupted["base"] / "out" / "mnist.keras").exists()


def test_truncated_checkpoint_gives_a_clear_error_and_overwrites_nothing(interrupted, tmp_path):
    from ray.train import Result

    runs = interrupted["base"] / "runs-copy"
    latest = Result.from_path(str(runs / "term")).checkpoint.path
    state = os.path.join(latest, "state.npz")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 3)
    size = os.path.getsize(state)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mnist.keras").write_bytes(b"the previous model")
    proc = run_job(*RECIPE, "--run-name", "term", "--storage-path", str(runs), "--output", str(out),
                   timeout=120)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and latest in last and "unreadable" in last
    assert os.path.getsize(state) == size  # the bad checkpoint is left as it was, for inspection
    assert (out / "mnist.keras").read_bytes() == b"the previous model"
    assert sorted(p.name for p in out.iterdir()) == ["mnist.keras"]


def test_rerun_resumes_the_interrupted_run_then_refuses_to_retrain(interrupted, undisturbed):
    rerun = run_job(*RECIPE, *interrupted["args"])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    assert "INFO" not in rerun.stdout + rerun.stderr  # Ray Train's own resume notices stay off the console
    metrics = read_metrics(interrupted["base"] / "out")
    assert_each_epoch_once_with_a_restart(metrics)
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005

    keras_file = interrupted["base"] / "out" / "mnist.keras"
    before = keras_file.stat().st_mtime_ns
    again = run_job(*RECIPE, *interrupted["args"], timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout and "--force" in again.stdout
    assert keras_file.stat().st_mtime_ns == before


@pytest.fixture
def four_node_cluster():
    """A CPU-less head and four 1-CPU nodes: 2 workers + 1 CPU for Ray Data, and one node to spare."""
    with simulated_cluster(head_cpus=0, node_cpus=[1, 1, 1, 1]) as cluster:
        yield cluster


def test_lost_node_restarts_the_group_on_the_remaining_nodes(tmp_path, four_node_cluster, undisturbed):
    """2 workers SPREAD over 1-CPU nodes (+1 CPU for Ray Data); the node of rank 1 is removed
    without grace after epoch 2, leaving 3 CPUs: enough to restart from the checkpoint."""
    proc = start_job("--address", four_node_cluster.address, "--placement-strategy", "SPREAD",
                     "--max-failures", "1", "--collective-timeout-s", "30", "--run-name", "node",
                     "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out"))
    checkpoint_dir = wait_for_epoch(tmp_path / "runs" / "node", 2, proc)
    with open(os.path.join(checkpoint_dir, "workers", "rank-1.json")) as f:
        lost = json.load(f)["node_id"]
    node = next(n for n in four_node_cluster.worker_nodes if n.node_id == lost)
    four_node_cluster.remove_node(node, allow_graceful=False)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    assert assert_each_epoch_once_with_a_restart(metrics) >= 3
    assert lost not in [w["node_id"] for w in metrics["workers"]]
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005
