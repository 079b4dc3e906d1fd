"""Shared test helpers: the committed MNIST sample, running the real job in a subprocess, and the
runs that several test files read (session fixtures, each trained once).

Tiers (markers: a module's `pytestmark`, or a fixture that starts Ray; checked here):
  unit   no Ray, no job process: `bash scripts/test.sh -m "not ray and not slow"` (about 2 minutes)
  ray    real Ray (a local one, `ray start`, a simulated cluster) on the committed sample
  slow   full MNIST (needs MNIST_DATA; CI sets it from ../shared/data/mnist)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trainer.common.net import loopback_port as free_port  # noqa: F401 - the name the tests use
from trainer.store.record import VersionRecord
from trainer.store.versions import PASSED

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "tests" / "data" / "mnist_sample.npz"  # 3,000 train + 1,000 test real MNIST digits
JOB = ROOT / "jobs" / "train_mnist.py"
RAY_FIXTURES = {"extras_run", "cluster"}  # fixtures that run the job or start a cluster
RAY_SESSIONS = Path(tempfile.gettempdir()) / "ray"  # a Ray started on this machine makes a session_* here


def pytest_collection_modifyitems(items):
    """A test that starts Ray is marked `ray`: where it is written (a module's `pytestmark`, for
    files whose tests run the job themselves), or by using a fixture that does."""
    for item in items:
        if RAY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(autouse=True)
def _unit_tests_start_no_ray(request):
    """The marker cannot drift: a test that is not marked `ray` and starts Ray (in-process, or in a
    job or script it runs) fails, so the unit tier stays free of Ray."""
    if request.node.get_closest_marker("ray"):
        yield
        return
    before = set(RAY_SESSIONS.glob("session_2*"))
    yield
    started = sorted(set(RAY_SESSIONS.glob("session_2*")) - before)
    if started:
        pytest.fail(f"this test started Ray ({started[0].name}) but is not marked `ray`: add "
                    "`pytestmark = pytest.mark.ray` to its module, or use a fixture in RAY_FIXTURES")


def job_env(**extra: str) -> dict:
    """The environment for a job or script subprocess: unbuffered, and never a cluster or an MLflow
    server the developer's shell happens to point at (RAY_ADDRESS, MLFLOW_TRACKING_URI) unless a
    test sets one."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def run_job(*args: str, timeout: float = 420, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run jobs/train_mnist.py as a user would; its local Ray lives and dies with the process."""
    return subprocess.run([sys.executable, str(JOB), *args], cwd=ROOT, env=job_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def start_job(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(JOB), *args], cwd=ROOT, env=job_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


class MlflowServer:
    """A real `mlflow server` on 127.0.0.1 (scripts/mlflow.sh: its own environment), with a SQLite
    backend and a local artifact root in `root`; stop() and start() again keep the port and data."""

    def __init__(self, root: Path):
        self.root, self.port, self.proc = Path(root), free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> "MlflowServer":
        import urllib.request

        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "mlflow.sh"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts")],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # No job runners (7 huey processes for MLflow's GenAI jobs): tracking needs none, and 2 cores feel them.
            env=job_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise AssertionError(f"mlflow server not up in {timeout} s: {(self.root / 'server.log').read_text()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM to the server's own process group (the script, mlflow, uvicorn), then SIGKILL."""
        import contextlib
        import signal

        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        with contextlib.suppress(ProcessLookupError):  # whatever of the group outlived its leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None


def read_metrics(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


def assert_each_step_used_the_global_batch(metrics: dict, train_rows: int) -> None:
    """From what the workers reported for every epoch, at whatever world size it ran: each step's
    per-rank batches summed to the configured global batch, and the epoch's shards were disjoint
    and covered the training rows."""
    batch = metrics["config"]["batch_size"]
    for epoch in metrics["epochs"]:
        assert epoch["global_batch"] == batch and epoch["examples"] == epoch["steps"] * batch, epoch
        assert epoch["global_rows_seen"] == train_rows and epoch["global_rows_duplicated"] == 0, epoch


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


def assert_each_epoch_once_with_a_restart(metrics):
    epochs = metrics["epochs"]
    assert [e["epoch"] for e in epochs] == list(range(1, metrics["config"]["epochs"] + 1))
    restarts = [e["epoch"] for e in epochs if e["restarted"]]
    assert len(restarts) == 1 and restarts[0] >= 2  # resumed from a checkpoint, not from epoch 0
    return restarts[0]


def add_version(store, decision: str = PASSED, accuracy: float = 0.98,
                data_sha256: str = "a" * 64, model=None, when=None,
                config: dict | None = None, parent: str | None = None, reference=None) -> str:
    """Register a version in a trainer.store.model_store.Store as retrain does; dummy model files unless a Keras
    model is given, and a shift reference if its outputs are given. A passed version is promoted."""
    from trainer.common.atomic import save_model_atomic
    from trainer.common.clock import iso, utc_now
    from trainer.store.versions import new_version_id

    vid = new_version_id(when)
    staging = store.new_staging(vid)
    if model is not None:
        save_model_atomic(model, os.path.join(staging, "mnist.keras"))
        save_model_atomic(model, os.path.join(staging, "mnist.h5"))
    else:
        for name in ("mnist.keras", "mnist.h5"):
            with open(os.path.join(staging, name), "w") as f:
                f.write("not a model")
    with open(os.path.join(staging, "metrics.json"), "w") as f:
        json.dump({"test_accuracy": accuracy}, f)
    if reference is not None:
        import numpy as np

        from trainer.data.shift import REFERENCE

        np.save(os.path.join(staging, REFERENCE), np.asarray(reference, np.float32), allow_pickle=False)
    store.register(VersionRecord(vid, decision=decision, reason=f"{decision} on purpose", test_accuracy=accuracy,
                                 started=iso(when or utc_now()), data={"content_sha256": data_sha256},
                                 config=config or {}, parent=parent))
    if decision == PASSED:
        store.promote(vid)
    return vid


def gpu_count() -> int:
    """GPUs this machine has, as nvidia-smi lists them (0 without a driver)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


@pytest.fixture(scope="session")
def full_mnist() -> str:
    """Full MNIST from $MNIST_DATA (CI sets it from ../shared/data/mnist); skip without it."""
    path = os.environ.get("MNIST_DATA")
    if not path or not os.path.exists(path):
        pytest.skip("full MNIST not available: set MNIST_DATA")
    return path


@pytest.fixture(scope="session")
def extras_run(tmp_path_factory) -> tuple[Path, Path, str]:
    """(output dir, TensorBoard dir, console) of one 2-worker run with every optional output on:
    the convnet with --augment, --tensorboard-dir, --export-savedmodel and --track (MLflow's embedded
    store). Read by the TensorBoard, export, augmentation and tracking tests."""
    root = tmp_path_factory.mktemp("extras")
    output, board = root / "out", root / "tb"
    proc = run_job("--data", str(SAMPLE), "--num-workers", "2", "--epochs", "2", "--model", "cnn",
                   "--augment", "--tensorboard-dir", str(board), "--export-savedmodel", "--track",
                   "--output", str(output), "--storage-path", str(root / "runs"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return output, board, proc.stdout + proc.stderr


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
