"""Faults really injected: a SIGKILLed worker, a worker frozen for 20 s and one frozen for good, a
failure past the retries, a CPU hog on every core, a SIGTERMed driver, a truncated checkpoint, a lost
node; and elastic training (--num-workers MIN-MAX) shrinking on a lost node and growing on a new one.

Each run is the real job on the committed sample with the same seed, default flags unless a test
says otherwise; epochs are made longer with a small batch so a fault lands mid-run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import (
    SAMPLE,
    assert_each_epoch_once_with_a_restart,
    assert_each_step_used_the_global_batch,
    read_metrics,
    run_job,
    simulated_cluster,
    start_job as start_any_job,
    wait_for_epoch,
    worker_pid,
)
from trainer.train.elastic import GREW, RERUN, SHRANK

pytestmark = pytest.mark.ray  # every test here runs the job or starts Ray

RECIPE = ["--data", str(SAMPLE), "--epochs", "5", "--batch-size", "32", "--seed", "0"]
GROW_EPOCHS = 8  # the grow test: epochs left after the freeze at epoch 1, however fast the machine


def start_job(*args):
    return start_any_job(*RECIPE, *args)


def finish(proc, timeout=420):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


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


def epoch_lines(console: str) -> str:
    """The job's epoch and resize lines, for the README (shown with -s)."""
    return "".join(line + "\n" for line in console.splitlines() if line.startswith(("epoch ", "resized ", "restarted ")))


def restart_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if line.startswith("restarted after a worker failure")]


def test_worker_sigkill_restarts_from_checkpoint_with_default_flags(tmp_path, undisturbed):
    """No --max-failures: the default allows restarts. The restart is one line on the console and a
    record in metrics.json."""
    proc = start_job("--run-name", "kill", "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out"))
    checkpoint_dir = wait_for_epoch(tmp_path / "runs" / "kill", 2, proc)
    victim = worker_pid(checkpoint_dir, rank=1)
    os.kill(victim, signal.SIGKILL)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert restart >= 3  # epoch 2's checkpoint was registered before the kill: nothing before it redone
    assert victim not in [w["pid"] for w in metrics["workers"]]  # a new worker group finished it
    assert restart_lines(out) == [f"restarted after a worker failure (rank 1's process died): continuing from "
                                  f"epoch {restart}, restart 1 of 3"]
    # An epoch shows once its checkpoint is registered: the one in flight when the worker died shows
    # once, after the restart line, and so does every other.
    shown = [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")]
    assert shown == [f"{e}/5" for e in range(1, 6)], out
    lines = out.splitlines()
    assert lines.index(restart_lines(out)[0]) < next(i for i, line in enumerate(lines)
                                                     if line.startswith(f"epoch {restart}/5 "))
    (record,) = metrics["restarts"]
    assert (record["restart"], record["of"], record["cause"], record["continuing_from_epoch"]) == (
        1, 3, "rank 1's process died", restart)
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005


def test_a_20s_stall_passes_with_default_flags(tmp_path, undisturbed):
    """Rank 1 is frozen (SIGSTOP) for 20 s mid-run, then continued: under the default
    --stall-timeout-s (60) nothing fails, nothing restarts, and the run is the undisturbed one.
    Before, TensorFlow's 10 s heartbeat timeout failed the run on a 10 s stall (scripts/stall.py)."""
    proc = start_job("--run-name", "stall", "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out"))
    victim = worker_pid(wait_for_epoch(tmp_path / "runs" / "stall", 2, proc), rank=1)
    os.kill(victim, signal.SIGSTOP)
    try:
        time.sleep(20)
    finally:
        os.kill(victim, signal.SIGCONT)
    code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5]
    assert not any(e["restarted"] for e in metrics["epochs"]) and metrics["restarts"] == []
    assert restart_lines(out) == [] and victim in [w["pid"] for w in metrics["workers"]]
    # The stall did land inside training: in an epoch or in a report between two (on a fast machine an
    # epoch of the sample is shorter than the wait for the checkpoint), so within the steps' span.
    assert metrics["timeline"]["last_step"] - metrics["timeline"]["first_step"] >= 19
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005


def test_a_frozen_peer_fails_the_step_after_the_stall_timeout_and_the_run_restarts(tmp_path, undisturbed):
    """Rank 1 is SIGSTOPped for good: alive to Ray, silent to rank 0, whose all-reduce waits on it.
    Past --stall-timeout-s the coordination service declares it gone (or the watchdog aborts rank
    0's collectives: tests/test_worker.py; or, frozen before ray.train.report's barrier, Ray Train
    times the barrier out), the step fails, and Ray Train restarts the group from
    the checkpoint, killing the frozen worker."""
    proc = start_job("--stall-timeout-s", "10", "--run-name", "frozen",
                     "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out"))
    victim = worker_pid(wait_for_epoch(tmp_path / "runs" / "frozen", 2, proc), rank=1)
    os.kill(victim, signal.SIGSTOP)
    try:
        code, out, err = finish(proc)
    finally:
        if alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert restart >= 3
    (line,) = restart_lines(out)
    # Whichever notices first fails the step: TensorFlow's coordination heartbeat, or the watchdog.
    assert line.startswith(("restarted after a worker failure (heartbeat timeout on rank 1)",
                            "restarted after a worker failure (no progress for 10s on rank 0)",
                            # frozen before ray.train.report's barrier: Ray Train names it, at the same bound
                            "restarted after a worker failure (no progress for 10s on rank 1)")), line
    assert [r["cause"] for r in metrics["restarts"]] == [line.split("(")[1].split(")")[0]]
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005


def test_a_failure_past_the_retries_ends_in_a_few_lines_with_the_cause_and_the_log(tmp_path):
    """Rank 1 frozen for good twice, with one restart allowed: the run fails for good. The console is
    the job's own lines and a short ending: the restart line, the one-line error, the failing
    worker's last frame and exception, and the path of its full log. No traceback, no TensorFlow
    C++ notices, no Ray deduplication notices."""
    runs = tmp_path / "runs"
    proc = start_job("--stall-timeout-s", "5", "--max-failures", "1", "--run-name", "fail",
                     "--storage-path", str(runs), "--output", str(tmp_path / "out"))
    frozen = []
    try:
        first = wait_for_epoch(runs / "fail", 2, proc)
        frozen.append(worker_pid(first, rank=1))
        os.kill(frozen[-1], signal.SIGSTOP)
        deadline = time.monotonic() + 300  # the restarted group's first checkpoint, with its new pids
        while time.monotonic() < deadline and proc.poll() is None:
            latest = wait_for_epoch(runs / "fail", 1, proc)
            pid = worker_pid(latest, rank=1)
            if pid != frozen[0]:
                frozen.append(pid)
                os.kill(pid, signal.SIGSTOP)
                break
            time.sleep(0.2)
        code, out, err = finish(proc)
    finally:
        for pid in frozen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert len(frozen) == 2 and code == 1, out[-2000:] + err[-3000:]
    console = (out + err).strip().splitlines()
    print("\n".join(console))  # for docs/operations.md (shown with -s)
    error_at = next(i for i, line in enumerate(console) if line.startswith("error: "))
    ending = console[error_at:]
    assert ending[0] in ("error: training failed after 1 restart: heartbeat timeout on rank 1",
                         "error: training failed after 1 restart: no progress for 5s on rank 0",
                         "error: training failed after 1 restart: no progress for 5s on rank 1"), ending
    assert 3 <= len(ending) <= 12 and ending[-1].startswith("full worker log: "), ending
    assert os.path.isfile(ending[-1].removeprefix("full worker log: "))
    assert len(restart_lines(out)) == 1
    for noise in ("Traceback", "oneDNN", "cuda drivers", "repeated", "absl::InitializeLog", "Error in training"):
        assert noise not in out + err, noise
    job_lines = [line for line in console if not line.startswith(("epoch ", "preparing data"))]
    assert len(job_lines) <= 15, console


def test_default_runs_complete_back_to_back_under_a_cpu_hog(tmp_path, undisturbed):
    """A busy process on every core for the whole test, and two default runs one after the other:
    both complete (a restart, if the hog starves a worker past the stall timeout, is allowed and
    printed). scripts/stall.py --hog --runs N is the longer soak on full MNIST (docs/operations.md)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        for run in ("first", "second"):
            code, out, err = finish(start_job("--run-name", run, "--storage-path", str(tmp_path / "runs"),
                                              "--output", str(tmp_path / run)), timeout=900)
            assert code == 0, err[-3000:]
            metrics = read_metrics(tmp_path / run)
            assert [e["epoch"] for e in metrics["epochs"]] == [1, 2, 3, 4, 5]
            assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.005
            print(f"under a CPU hog: run {run}, {len(metrics['restarts'])} restarts, "
                  f"{metrics['wall_seconds']:.0f} s, test accuracy {metrics['test_accuracy']:.4f}")
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


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


def test_rerun_at_another_size_resumes_the_interrupted_run_then_refuses_to_retrain(interrupted, undisturbed):
    """The run was interrupted at 2 workers; the rerun asks for 1 and continues from its checkpoint
    (weights and optimizer state are replicated, so any world size restores them)."""
    rerun = run_job(*RECIPE, *interrupted["args"], "--num-workers", "1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    assert "INFO" not in rerun.stdout + rerun.stderr  # Ray Train's own resume notices stay off the console
    metrics = read_metrics(interrupted["base"] / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert metrics["world_sizes"] == [2] * (restart - 1) + [1] * (6 - restart)
    assert [(r["from"], r["to"], r["reason"]) for r in metrics["resizes"]] == [(2, 1, RERUN)]
    assert "resized from 2 to 1 workers" in rerun.stdout
    assert_each_step_used_the_global_batch(metrics, 3000)
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.015

    keras_file = interrupted["base"] / "out" / "mnist.keras"
    before = keras_file.stat().st_mtime_ns
    again = run_job(*RECIPE, *interrupted["args"], timeout=120)
    assert again.returncode == 0 and "already finished" in again.stdout and "--force" in again.stdout
    assert keras_file.stat().st_mtime_ns == before


@pytest.fixture
def four_node_cluster():
    """A CPU-less head and four 1-CPU nodes: 2 workers, and nodes to spare."""
    with simulated_cluster(head_cpus=0, node_cpus=[1, 1, 1, 1]) as cluster:
        yield cluster


def test_lost_node_restarts_the_group_on_the_remaining_nodes(tmp_path, four_node_cluster, undisturbed):
    """2 workers SPREAD over 1-CPU nodes; the node of rank 1 is removed without grace after
    epoch 2, leaving 3 CPUs: enough to restart from the checkpoint."""
    proc = start_job("--address", four_node_cluster.address, "--placement-strategy", "SPREAD",
                     "--max-failures", "1", "--stall-timeout-s", "30", "--run-name", "node",
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


# ---------------------------------------------------------------------------- elastic training

def test_elastic_run_shrinks_when_a_node_is_lost_and_finishes_every_epoch(tmp_path, undisturbed):
    """--num-workers 1-3 on a CPU-less head and three 1-CPU nodes starts 3 workers; rank 1's node is
    removed without grace once epoch 2 is checkpointed, and Ray Train restarts on the 2 that fit. The
    run is tracked in MLflow, where the resize shows."""
    with simulated_cluster(head_cpus=0, node_cpus=[1, 1, 1]) as cluster:
        proc = start_job("--address", cluster.address, "--num-workers", "1-3", "--max-failures", "1",
                         "--stall-timeout-s", "30", "--run-name", "shrink", "--track",
                         "--storage-path", str(tmp_path / "runs"), "--output", str(tmp_path / "out"))
        checkpoint_dir = wait_for_epoch(tmp_path / "runs" / "shrink", 2, proc)
        with open(os.path.join(checkpoint_dir, "workers", "rank-1.json")) as f:
            lost = json.load(f)["node_id"]
        cluster.remove_node(next(n for n in cluster.worker_nodes if n.node_id == lost), allow_graceful=False)
        code, out, err = finish(proc)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert metrics["world_sizes"] == [3] * (restart - 1) + [2] * (6 - restart)
    (resize,) = metrics["resizes"]
    assert (resize["after_epoch"], resize["from"], resize["to"], resize["reason"]) == (restart - 1, 3, 2, SHRANK)
    # One line for the event: the restart line says why, the next epoch's line to what size.
    (resumed,) = [line for line in out.splitlines() if line.startswith(f"epoch {restart}/")]
    assert resumed.split("  ")[1] == "2 workers" and resumed.endswith("(resized from 3)"), out
    assert len(restart_lines(out)) == 1 and "resized from 3 to 2" not in out
    # Ray Train's retries at the old size, before its view of the nodes caught up, are the job's own
    # doing (a 5 s start timeout): no "Error in control loop iteration" traceback for them.
    assert "Traceback" not in out + err and "control loop" not in out + err, out + err
    assert lost not in [w["node_id"] for w in metrics["workers"]]
    assert_each_step_used_the_global_batch(metrics, 3000)  # at 3 workers (11+11+10) and at 2 (16+16)
    assert abs(metrics["test_accuracy"] - undisturbed["test_accuracy"]) <= 0.015
    # MLflow (--track, the embedded store): the resize is on the run, as it happened and in the summary.
    from mlflow import MlflowClient

    from trainer.track.run import describe_resize

    mlflow_client = MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    tags = mlflow_client.get_run(metrics["tracking"]["run_id"]).data.tags
    assert tags[f"resized_at_epoch.{restart}"] == "3 -> 2 workers" and tags["resize.1"] == describe_resize(resize)
    sizes = {m.step: int(m.value) for m in sorted(mlflow_client.get_metric_history(metrics["tracking"]["run_id"],
                                                                                   "world_size"), key=lambda m: m.timestamp)}
    assert list(sizes.values()) == metrics["world_sizes"]  # each epoch's latest point, as the run kept it
    print(epoch_lines(out))
    print(f"shrink: {resize}; test accuracy {metrics['test_accuracy']:.4f} against "
          f"{undisturbed['test_accuracy']:.4f} undisturbed")


def test_elastic_run_grows_onto_a_new_node_without_spending_a_failure(tmp_path):
    """--num-workers 2-3 on two 1-CPU nodes starts 2 workers; once epoch 1 is checkpointed, rank 1 is
    frozen (SIGSTOP) and a third node joins. Ray Train sees the node within its resource view's 20 s
    refresh plus the resize interval, and restarts on 3 workers from the latest checkpoint, well
    inside the stall timeout (60 s), and --max-failures 0 still holds: growth is no failure. The
    freeze keeps the run from finishing before Ray Train looks, however fast the machine."""
    with simulated_cluster(head_cpus=0, node_cpus=[1, 1]) as cluster:
        proc = start_any_job("--data", str(SAMPLE), "--epochs", str(GROW_EPOCHS), "--batch-size", "8", "--seed", "0",
                             "--address", cluster.address, "--num-workers", "2-3", "--resize-interval-s", "2",
                             "--max-failures", "0", "--run-name", "grow", "--storage-path", str(tmp_path / "runs"),
                             "--output", str(tmp_path / "out"))
        frozen = worker_pid(wait_for_epoch(tmp_path / "runs" / "grow", 1, proc), rank=1)
        os.kill(frozen, signal.SIGSTOP)
        try:
            cluster.add_node(node_ip_address="127.0.0.1", include_dashboard=False, num_cpus=1)
            code, out, err = finish(proc)
        finally:
            if alive(frozen):  # Ray Train kills the old group when it resizes; never leave one stopped
                os.kill(frozen, signal.SIGCONT)
    assert code == 0, err[-3000:]
    metrics = read_metrics(tmp_path / "out")
    restart = assert_each_epoch_once_with_a_restart(metrics)
    assert metrics["world_sizes"] == [2] * (restart - 1) + [3] * (GROW_EPOCHS + 1 - restart)
    (resize,) = metrics["resizes"]
    assert (resize["from"], resize["to"], resize["reason"]) == (2, 3, GREW)
    assert "resized from 2 to 3 workers" in out
    assert_each_step_used_the_global_batch(metrics, 3000)  # at 2 workers (4+4) and at 3 (3+3+2)
    print(epoch_lines(out))
    print(f"grow: {resize}; test accuracy {metrics['test_accuracy']:.4f}")
